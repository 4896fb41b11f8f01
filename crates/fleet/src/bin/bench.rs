//! `peerline-fleet-bench`: per-operation latency and throughput of the Redis Cluster fleet
//! directory, and the memory one location entry takes. Run it in release mode against a
//! cluster that nothing else loads:
//!
//! ```sh
//! eval "$(bash scripts/fleet-services.sh start)"
//! cargo run --release -p peerline-fleet --bin peerline-fleet-bench -- --json
//! ```
//!
//! Every key it writes is under a fresh prefix and expires two minutes after the run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use peerline_fleet::{
    conformance::member, DirectoryUrl, FleetConfig, FleetDirectory, FleetLocation, RedisDirectory,
    Username,
};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "Measure the Redis Cluster fleet directory: latency, throughput, memory")]
struct Args {
    /// Directory URL: redis://h1:p1,h2:p2,...
    #[arg(long, env = "PEERLINE_TEST_REDIS_URL")]
    url: String,
    /// Single-key operations (claim, lookup, release) per measurement.
    #[arg(long, default_value_t = 20_000)]
    ops: u32,
    /// Concurrent tasks in the concurrent measurements.
    #[arg(long, default_value_t = 32)]
    concurrency: u32,
    /// Location entries to write for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 100_000)]
    memory_entries: u32,
    /// Members to announce for the members() read measurement (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    members: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Claim,
    Lookup,
    LookupMany,
    Release,
    Refresh,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Claim => "claim",
            Op::Lookup => "lookup",
            Op::LookupMany => "lookup_many(50)",
            Op::Release => "release",
            Op::Refresh => "refresh(1000)",
        }
    }
    fn keys(self) -> u32 {
        match self {
            Op::LookupMany => 50,
            Op::Refresh => 1000,
            _ => 1,
        }
    }
}

struct Outcome {
    op: Op,
    tasks: u32,
    ops: u32,
    seconds: f64,
    /// CPU seconds the Redis masters spent meanwhile (None: not measurable from here).
    server_cpu: Option<f64>,
    hist: Histogram<u64>,
}

fn name(i: u32) -> Username {
    // "u" and decimal digits always form a valid username.
    Username::parse(&format!("u{i:07}")).expect("generated usernames are valid")
}

const HOME: FleetLocation = FleetLocation { node: 1, epoch: 1 };

async fn one(dir: &RedisDirectory, op: Op, i: u32, users: &[Username]) -> Result<()> {
    let n = users.len() as u32;
    let u = &users[(i % n) as usize];
    match op {
        Op::Claim => {
            dir.claim(u, HOME).await?;
        }
        Op::Lookup => {
            if dir.lookup(u).await?.is_none() {
                bail!("lookup of a claimed user found nothing");
            }
        }
        Op::Release => {
            dir.release(u, HOME).await?;
        }
        Op::LookupMany => {
            // 50 users spread over the pool, as a contact list would be.
            let batch: Vec<Username> = (0..50)
                .map(|k| users[((i.wrapping_mul(50) + k * 7919) % n) as usize].clone())
                .collect();
            dir.lookup_many(&batch).await?;
        }
        Op::Refresh => {
            let start = (i * 1000) % n;
            let batch: Vec<(Username, FleetLocation)> = (0..1000)
                .map(|k| (users[((start + k) % n) as usize].clone(), HOME))
                .collect();
            let ours = dir.refresh(&batch).await?;
            if ours.iter().any(|o| !o) {
                bail!("refresh found an entry claimed elsewhere");
            }
        }
    }
    Ok(())
}

async fn measure(
    url: &str,
    dir: Arc<RedisDirectory>,
    users: Arc<Vec<Username>>,
    op: Op,
    ops: u32,
    tasks: u32,
) -> Result<Outcome> {
    let cpu_before = server_cpu(url).await.ok();
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (dir, users) = (Arc::clone(&dir), Arc::clone(&users));
        handles.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).context("histogram")?;
            // Task t does operations t, t + tasks, ...: every index exactly once overall.
            let mut i = t;
            while i < ops {
                let t0 = Instant::now();
                one(&dir, op, i, &users).await?;
                hist.record(t0.elapsed().as_micros() as u64)?;
                i += tasks;
            }
            anyhow::Ok(hist)
        }));
    }
    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    for h in handles {
        hist.add(h.await.context("benchmark task")??)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = server_cpu(url).await.ok();
    Ok(Outcome {
        op,
        tasks,
        ops,
        seconds,
        server_cpu: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        hist,
    })
}

/// The cost of one members() read (what every directory handle does once per member
/// cache period) with `n` members announced.
async fn members_read(url: &str, config: &FleetConfig, n: u32) -> Result<serde_json::Value> {
    let cfg = FleetConfig {
        prefix: format!("{}-members", config.prefix),
        // Announcing thousands of members takes a while: keep the first ones alive.
        member_ttl: Duration::from_secs(120),
        ..config.clone()
    };
    let dir = Arc::new(RedisDirectory::connect_with(url, cfg.clone()).await?);
    let mut tasks = Vec::new();
    for t in 0..32 {
        let dir = Arc::clone(&dir);
        tasks.push(tokio::spawn(async move {
            let mut id = t;
            while id < n {
                let mut m = member(id, 1_764_000_000_000 + u64::from(id));
                m.online = 4100;
                m.capacity = 1_000_000;
                dir.announce(&m).await?;
                id += 32;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("announce task")??;
    }
    let reads = 50;
    let mut hist = Histogram::<u64>::new(3).context("histogram")?;
    let cpu_before = server_cpu(url).await.ok();
    for _ in 0..reads {
        let t0 = Instant::now();
        let got = dir.members().await?;
        hist.record(t0.elapsed().as_micros() as u64)?;
        if got.len() != n as usize {
            bail!("members() returned {} of {n} members", got.len());
        }
    }
    let cpu = cpu_before
        .zip(server_cpu(url).await.ok())
        .map(|(b, a)| ((a - b) * 1e6 / f64::from(reads)).round() as u64);
    let hash_bytes = memory_usage_of(url, &format!("{}:members", cfg.prefix)).await?;
    // Drop the fake members at once: the master that holds the hash unlinks it, the others
    // answer MOVED, which is ignored.
    for seed in seeds(url)? {
        let mut c = redis::Client::open(seed)?
            .get_multiplexed_async_connection()
            .await?;
        let _: redis::RedisResult<i64> = redis::cmd("UNLINK")
            .arg(format!("{}:members", cfg.prefix))
            .query_async(&mut c)
            .await;
    }
    Ok(json!({
        "members": n,
        "hash_bytes": hash_bytes,
        "reads": reads,
        "median_us": hist.value_at_quantile(0.5),
        "p99_us": hist.value_at_quantile(0.99),
        "redis_cpu_us_per_read": cpu,
    }))
}

fn seeds(url: &str) -> Result<Vec<String>> {
    match DirectoryUrl::parse(url)? {
        DirectoryUrl::Redis { nodes, .. } => Ok(nodes
            .iter()
            .map(|(h, p)| format!("redis://{h}:{p}"))
            .collect()),
        DirectoryUrl::Memory => bail!("the benchmark needs a redis:// URL"),
    }
}

/// used_memory summed over the masters named in the URL.
async fn used_memory(url: &str) -> Result<u64> {
    let v = info_sum(url, "memory", &["used_memory"]).await?;
    Ok(v as u64)
}

/// CPU seconds (user + system) the masters named in the URL have used so far.
async fn server_cpu(url: &str) -> Result<f64> {
    info_sum(url, "cpu", &["used_cpu_user", "used_cpu_sys"]).await
}

/// The sum of INFO `fields` of `section` over the masters named in the URL.
async fn info_sum(url: &str, section: &str, fields: &[&str]) -> Result<f64> {
    let DirectoryUrl::Redis { nodes, .. } = DirectoryUrl::parse(url)? else {
        bail!("the memory measurement needs a redis:// URL");
    };
    let mut total = 0.0;
    for (host, port) in nodes {
        let client = redis::Client::open(format!("redis://{host}:{port}"))?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await?;
        if !matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
            continue;
        }
        let info: String = redis::cmd("INFO").arg(section).query_async(&mut c).await?;
        for field in fields {
            let prefix = format!("{field}:");
            total += info
                .lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .with_context(|| format!("INFO {section} has no {field}"))?;
        }
    }
    Ok(total)
}

async fn memory_usage_of(url: &str, key: &str) -> Result<i64> {
    let DirectoryUrl::Redis { nodes, .. } = DirectoryUrl::parse(url)? else {
        bail!("the memory measurement needs a redis:// URL");
    };
    // Ask every seed node; the one that owns the key answers, the others redirect.
    for (host, port) in nodes {
        let client = redis::Client::open(format!("redis://{host}:{port}"))?;
        let mut c = client.get_multiplexed_async_connection().await?;
        let r: redis::RedisResult<Option<i64>> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(key)
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut c)
            .await;
        if let Ok(Some(n)) = r {
            return Ok(n);
        }
    }
    bail!("no node answered MEMORY USAGE for {key}")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.ops < 1000 || args.concurrency == 0 {
        bail!("--ops must be at least 1000 and --concurrency at least 1");
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let config = FleetConfig {
        prefix: format!("peerline-bench:{stamp}"),
        location_ttl: Duration::from_secs(120),
        ..FleetConfig::default()
    };
    let dir = Arc::new(
        RedisDirectory::connect_with(&args.url, config.clone())
            .await
            .with_context(|| format!("cannot connect to the directory at {}", args.url))?,
    );
    let home = member(HOME.node, HOME.epoch);
    dir.announce(&home).await?;
    // Keep the member alive, as a supernode would, so lookups resolve.
    let keepalive = {
        let dir = Arc::clone(&dir);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = dir.announce(&home).await;
            }
        })
    };

    let users: Arc<Vec<Username>> = Arc::new((0..args.ops).map(name).collect());
    let mut results = Vec::new();
    for tasks in [1, args.concurrency] {
        let many = (args.ops / 10).max(100);
        let refreshes = (args.ops / 500).max(20);
        for (op, n) in [
            (Op::Claim, args.ops),
            (Op::Lookup, args.ops),
            (Op::LookupMany, many),
            (Op::Refresh, refreshes),
            (Op::Release, args.ops),
        ] {
            results.push(
                measure(
                    &args.url,
                    Arc::clone(&dir),
                    Arc::clone(&users),
                    op,
                    n,
                    tasks,
                )
                .await?,
            );
        }
    }

    let memory = if args.memory_entries > 0 {
        let mem_cfg = FleetConfig {
            // As long as the default prefix "peerline", so the key sizes are realistic.
            prefix: format!("pb{:06x}", stamp % 0xff_ffff),
            ..config.clone()
        };
        let mdir = RedisDirectory::connect_with(&args.url, mem_cfg).await?;
        let before = used_memory(&args.url).await?;
        let n = args.memory_entries;
        let mut i = 0;
        while i < n {
            // Refresh creates entries that do not exist yet: 1000 per pipelined batch.
            let batch: Vec<(Username, FleetLocation)> = (i..(i + 1000).min(n))
                .map(|k| {
                    (
                        name(k),
                        FleetLocation {
                            node: 4321,
                            epoch: 1_764_000_000_000,
                        },
                    )
                })
                .collect();
            mdir.refresh(&batch).await?;
            i += 1000;
        }
        let after = used_memory(&args.url).await?;
        let key = format!("{}:loc:{}", mdir.config().prefix, name(42));
        let sample = memory_usage_of(&args.url, &key).await?;
        Some((n, before, after, sample))
    } else {
        None
    };
    keepalive.abort();
    dir.withdraw(HOME.node).await?;

    let members = if args.members > 0 {
        Some(members_read(&args.url, &config, args.members).await?)
    } else {
        None
    };

    let rows: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let ops_s = f64::from(r.ops) / r.seconds;
            json!({
                "op": r.op.name(),
                "tasks": r.tasks,
                "ops": r.ops,
                "keys_per_op": r.op.keys(),
                "seconds": r.seconds,
                "ops_per_s": ops_s.round() as u64,
                "keys_per_s": (ops_s * f64::from(r.op.keys())).round() as u64,
                "median_us": r.hist.value_at_quantile(0.5),
                "p99_us": r.hist.value_at_quantile(0.99),
                "max_us": r.hist.max(),
                "redis_cpu_s": r.server_cpu,
                "redis_cpu_us_per_key": r.server_cpu
                    .map(|c| (c * 1e6 / f64::from(r.ops * r.op.keys()) * 100.0).round() / 100.0),
            })
        })
        .collect();
    let memory_json = memory.map(|(n, before, after, sample)| {
        json!({
            "entries": n,
            "used_memory_before": before,
            "used_memory_after": after,
            "bytes_per_entry": (after.saturating_sub(before) as f64 / f64::from(n)).round() as u64,
            "memory_usage_one_key": sample,
        })
    });
    if args.json {
        let out = json!({
            "url": args.url,
            "results": rows,
            "memory": memory_json,
            "members_read": members,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "{:<16} {:>5} {:>7} {:>8} {:>9} {:>8} {:>8} {:>14}",
            "op", "tasks", "ops", "ops/s", "keys/s", "p50 us", "p99 us", "redis us/key"
        );
        for r in &rows {
            println!(
                "{:<16} {:>5} {:>7} {:>8} {:>9} {:>8} {:>8} {:>14}",
                r["op"].as_str().unwrap_or(""),
                r["tasks"].to_string(),
                r["ops"].to_string(),
                r["ops_per_s"].to_string(),
                r["keys_per_s"].to_string(),
                r["median_us"].to_string(),
                r["p99_us"].to_string(),
                r["redis_cpu_us_per_key"].to_string()
            );
        }
        if let Some(m) = memory_json {
            println!(
                "memory: {} entries, {} bytes each (used_memory delta over the masters); MEMORY USAGE of one key: {} bytes",
                m["entries"], m["bytes_per_entry"], m["memory_usage_one_key"]
            );
        }
        if let Some(m) = members {
            println!(
                "members(): {} members, {} bytes in the hash, read p50 {} us, p99 {} us, {} us of Redis CPU per read",
                m["members"], m["hash_bytes"], m["median_us"], m["p99_us"], m["redis_cpu_us_per_read"]
            );
        }
    }
    Ok(())
}
