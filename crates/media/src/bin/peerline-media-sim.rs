//! `peerline-media-sim IN.wav OUT.wav [--loss PCT] [--jitter-ms MS] [--burst] --seed N [--json]`:
//! speech through Peerline's media engine over an emulated path, on virtual time.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use peerline_media::codec::Bandwidth;
use peerline_media::netem::{ChannelConfig, LossModel};
use peerline_media::sim::{simulate, SimConfig};
use peerline_media::{wav, MediaConfig};

/// Runs a WAV file through encoder, emulated channel, jitter buffer and decoder, writes what
/// the listener hears, and reports delay, bitrate and call statistics.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Input WAV (any common rate and channel count).
    input: PathBuf,
    /// Output WAV: what the listener hears, 48 kHz mono, from the start of the call.
    output: PathBuf,
    /// Packet loss in percent, both directions.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Bursty loss (Gilbert-Elliott with mean burst `--burst-len`) instead of random.
    #[arg(long)]
    burst: bool,
    /// Mean burst length in packets with `--burst`.
    #[arg(long, default_value_t = 3.0)]
    burst_len: f64,
    /// Peak-to-peak delay spread (uniform), ms.
    #[arg(long, default_value_t = 0.0)]
    jitter_ms: f64,
    /// Fixed one-way delay, ms.
    #[arg(long, default_value_t = 40.0)]
    delay_ms: f64,
    /// Duplicated packets in percent.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Highest coded audio band: wide (8 kHz, the default), superwide (12 kHz) or full.
    #[arg(long, default_value = "wide", value_parser = ["wide", "superwide", "full"])]
    bandwidth: String,
    /// Seed of the channel's random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("peerline-media-sim: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if !(0.0..100.0).contains(&args.loss) || args.jitter_ms < 0.0 || args.delay_ms < 0.0 {
        bail!("--loss must be in 0..100, --jitter-ms and --delay-ms not negative");
    }
    let input =
        wav::read_wav(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    if input.is_empty() {
        bail!("{} holds no audio", args.input.display());
    }
    let loss = if args.burst {
        LossModel::bursty(args.loss / 100.0, args.burst_len)
    } else {
        LossModel::Random {
            p: args.loss / 100.0,
        }
    };
    let channel = ChannelConfig {
        loss,
        delay_ms: args.delay_ms,
        jitter_ms: args.jitter_ms,
        duplicate: args.duplicate / 100.0,
    };
    let mut media = MediaConfig::default();
    media.rate.max_bandwidth = match args.bandwidth.as_str() {
        "superwide" => Bandwidth::Superwideband,
        "full" => Bandwidth::Fullband,
        _ => Bandwidth::Wideband,
    };
    let cfg = SimConfig {
        forward: channel,
        reverse: channel,
        seed: args.seed,
        media,
        tail_ms: 1000,
        playout_phase_ms: 10,
    };
    let (out, report) = simulate(&input, &cfg).context("running the call")?;
    wav::write_wav(&args.output, &out)
        .with_context(|| format!("writing {}", args.output.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let l = &report.listener;
        let t = &report.talker;
        println!("audio             {:.1} s", report.seconds);
        println!(
            "delay             mouth-to-ear {:.1} ms, network mean {:.1} ms, added {:.1} ms (codec {:.1} ms)",
            report.mouth_to_ear_ms, report.network_mean_ms, report.added_delay_ms, l.codec_delay_ms
        );
        println!(
            "playout delay     mean {:.1} ms, target now {:.1} ms",
            l.mean_playout_delay_ms, l.receive.target_delay_ms
        );
        println!(
            "bitrate           {:.1} kb/s sent ({:.1} kb/s Opus), now {:.0} kb/s, RED depth {}, FEC {}",
            t.send_kbps, t.opus_kbps, t.bitrate_kbps, t.red_depth, t.fec
        );
        println!(
            "loss              {:.2} % before recovery, {:.2} % after",
            l.loss_before_recovery * 100.0,
            l.loss_after_recovery * 100.0
        );
        println!(
            "frames            {} decoded, {} from RED, {} from FEC, {} concealed, {} DTX",
            l.receive.frames_decoded,
            l.receive.frames_recovered_red,
            l.receive.frames_recovered_fec,
            l.receive.frames_concealed,
            l.receive.frames_dtx
        );
        println!(
            "jitter            {:.1} ms; RTT {} ms",
            l.jitter_ms,
            t.rtt_ms.map_or("-".into(), |r| format!("{r:.1}"))
        );
        println!(
            "fidelity          correlation {:.3}, SNR {:.1} dB",
            report.correlation, report.snr_db
        );
    }
    Ok(())
}
