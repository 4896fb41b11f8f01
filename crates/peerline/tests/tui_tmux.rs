//! Two real terminal apps in tmux against a real supernode on loopback, driven with
//! `send-keys` and read with `capture-pane`, as a person would use them.
//!
//! Every wait polls the screen against a generous deadline (the machine may be slow and
//! shared); nothing relies on a fixed sleep. The tmux server runs on a private socket and
//! is killed when the test ends, whatever happens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{free_port, peerline_bin, peerlined_bin};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any one screen may take to show what is expected.
const DEADLINE: Duration = Duration::from_secs(60);

/// A supernode on loopback, killed on drop.
struct Supernode {
    data: PathBuf,
    child: Child,
}

impl Supernode {
    fn start(root: &Path) -> Self {
        let data = root.join("supernode");
        let out = Command::new(peerlined_bin())
            .args(["init", "--data"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin", &format!("127.0.0.1:{}", free_port())])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = std::fs::File::create(data.join("test.log")).unwrap();
        let child = Command::new(peerlined_bin())
            .args(["run", "--data"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::fs::read_to_string(data.join("peerlined.pid"))
            .map(|p| p.trim() != child.id().to_string())
            .unwrap_or(true)
        {
            assert!(start.elapsed() < DEADLINE, "peerlined did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Supernode { data, child }
    }

    fn bootstrap(&self) -> String {
        std::fs::read_to_string(self.data.join("bootstrap"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for Supernode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A profile whose agent (started by the app, in its own process group) is stopped on drop.
struct Profile(PathBuf);

impl Drop for Profile {
    fn drop(&mut self) {
        let _ = Command::new(peerline_bin())
            .arg("--profile")
            .arg(&self.0)
            .arg("down")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A tmux server on a private socket, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        let ok = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "tmux is needed for this test: install it (scripts/install-deps.sh)"
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Tmux {
            socket: format!("peerline-tui-test-{}-{nanos}", std::process::id()),
        }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .env("TERM", "xterm-256color")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts `peerline --profile P tui ARGS` in a new 100x30 session called `name`; its
    /// exit status is written to `exit_file` (more dependable than tmux's own record).
    fn start_app(&self, name: &str, profile: &Path, args: &[&str], exit_file: &Path) {
        let bin = peerline_bin();
        let script = format!("\"$0\" \"$@\"; echo $? > '{}'", exit_file.display());
        let mut argv = vec![
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "100",
            "-y",
            "30",
            "sh",
            "-c",
            &script,
            bin.to_str().unwrap(),
            "--profile",
            profile.to_str().unwrap(),
            "tui",
        ];
        argv.extend_from_slice(args);
        // Keep the pane after the program ends, so its last screen can be read.
        argv.extend_from_slice(&[";", "set-option", "-g", "remain-on-exit", "on"]);
        self.ok(&argv);
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let mut argv = vec!["send-keys", "-t", name];
        argv.extend_from_slice(keys);
        self.ok(&argv);
    }

    fn text(&self, name: &str, text: &str) {
        self.ok(&["send-keys", "-t", name, "-l", text]);
    }

    fn screen(&self, name: &str) -> String {
        self.ok(&["capture-pane", "-p", "-t", name])
    }

    /// Waits until `name`'s screen satisfies `pred`; fails with the screen if it never does.
    fn wait(&self, name: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen(name);
            if pred(&s) {
                return s;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{name}'s screen never showed {what}; it shows:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    fn wait_for(&self, name: &str, needle: &str) -> String {
        self.wait(name, &format!("{needle:?}"), |s| s.contains(needle))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // The server leaves its socket file behind: remove it too.
        let path = self.cmd(&["display-message", "-p", "#{socket_path}"]);
        let _ = self.cmd(&["kill-server"]);
        let path = String::from_utf8_lossy(&path.stdout).trim().to_string();
        if path.contains(&self.socket) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The screen without its status bar (which names the supernode).
fn without_status_bar(screen: &str) -> String {
    screen
        .lines()
        .filter(|l| !l.contains("online via"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The line of `screen` holding `needle`.
fn line_with<'a>(screen: &'a str, needle: &str) -> &'a str {
    screen.lines().find(|l| l.contains(needle)).unwrap_or("")
}

#[test]
fn two_apps_in_tmux_request_accept_chat_presence_and_call() {
    let root = tempfile::tempdir().unwrap();
    let sn = Supernode::start(root.path());
    let bootstrap = sn.bootstrap();
    let alice = Profile(root.path().join("alice"));
    let bob = Profile(root.path().join("bob"));
    // Bob registers with the command line; alice will register inside the app.
    let out = Command::new(peerline_bin())
        .arg("--profile")
        .arg(&bob.0)
        .args(["register", "bob", "--server", &bootstrap])
        .env("PEERLINE_PASSWORD", "bob-password")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tmux = Tmux::new();
    let t0 = Instant::now();

    // Alice's profile has no account: the app offers to create one.
    let alice_exit = root.path().join("alice.exit");
    tmux.start_app("alice", &alice.0, &["--server", &bootstrap], &alice_exit);
    let s = tmux.wait_for("alice", "Welcome to Peerline");
    // A long entry shows its end.
    let tail = &bootstrap[bootstrap.len() - 20..];
    assert!(s.contains(tail), "server not pre-filled:\n{s}");
    tmux.text("alice", "alice");
    tmux.keys("alice", &["Tab", "Tab"]);
    tmux.text("alice", "alice-password");
    // The password never shows.
    let s = tmux.wait_for("alice", "**************");
    assert!(!s.contains("alice-password"), "password echoed:\n{s}");
    tmux.keys("alice", &["Enter", "Enter"]);
    // Registered, agent started by the app, online.
    tmux.wait_for("alice", "online via");

    // Bob's app starts his agent too.
    tmux.start_app("bob", &bob.0, &[], &root.path().join("bob.exit"));
    tmux.wait_for("bob", "online via");
    eprintln!("both apps online after {:?}", t0.elapsed());

    // Bob finds alice and sends her a request; search shows names only.
    tmux.keys("bob", &["/"]);
    tmux.wait_for("bob", "Find people");
    tmux.text("bob", "ali");
    tmux.keys("bob", &["Enter"]);
    let s = tmux.wait_for("bob", "> alice");
    // (The status bar names the supernode; a user's address shows nowhere.)
    assert!(
        !without_status_bar(&s).contains("127.0.0.1"),
        "search shows an address:\n{s}"
    );
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("bob", "Waiting for an answer");

    // Alice sees the request arrive live and accepts it.
    tmux.wait_for("alice", "Requests");
    tmux.wait("alice", "bob's request highlighted", |s| {
        line_with(s, "? bob").contains('>')
    });
    tmux.keys("alice", &["a"]);
    let s = tmux.wait("alice", "bob as an online contact", |s| {
        s.contains("● bob") && !s.contains("Requests")
    });
    assert!(
        !without_status_bar(&s).contains("127.0.0.1"),
        "contact list shows an address:\n{s}"
    );
    tmux.wait("bob", "alice as an online contact", |s| {
        s.contains("● alice") && !s.contains("Waiting for an answer")
    });

    // Both open the conversation; messages appear live on the other screen.
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("alice", "● bob · online");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("bob", "● alice · online");
    tmux.text("alice", "hello bob, from the app");
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("bob", "alice: hello bob, from the app");
    let s = tmux.wait_for("alice", "✓ direct");
    assert!(
        line_with(&s, "hello bob, from the app").contains("alice:"),
        "{s}"
    );
    tmux.text("bob", "hi alice, got it");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("alice", "bob: hi alice, got it");
    eprintln!("messages exchanged after {:?}", t0.elapsed());

    // Bob leaves the input line and sets himself away; alice's screen shows it.
    tmux.keys("bob", &["Escape"]);
    tmux.wait_for("bob", "Message (Tab to type)");
    tmux.keys("bob", &["p"]);
    tmux.wait_for("bob", "Your presence");
    tmux.keys("bob", &["Down", "Enter"]);
    tmux.wait_for("bob", "you are away");
    let s = tmux.wait_for("alice", "◐ bob · away");
    assert!(line_with(&s, " bob ").contains('◐'), "{s}");

    // The agent stops under the app: the app starts it again and follows the new one.
    let agent_pid = |p: &Path| -> serde_json::Value {
        let out = Command::new(peerline_bin())
            .arg("--profile")
            .arg(p)
            .args(["status", "--json"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["online"] == true {
            v["agent_pid"].clone()
        } else {
            serde_json::Value::Null
        }
    };
    let before = agent_pid(&alice.0);
    assert!(before.is_u64(), "alice's agent is not online");
    let down = Command::new(peerline_bin())
        .arg("--profile")
        .arg(&alice.0)
        .arg("down")
        .output()
        .unwrap();
    assert!(down.status.success());
    let start = Instant::now();
    loop {
        let now = agent_pid(&alice.0);
        if now.is_u64() && now != before {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the app did not restart alice's agent; it shows:\n{}",
            tmux.screen("alice")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    tmux.wait_for("alice", "online via");
    tmux.keys("bob", &["Tab"]);
    tmux.wait_for("bob", "Message (Enter sends");
    tmux.text("bob", "still there?");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("alice", "bob: still there?");
    eprintln!("agent restarted and followed after {:?}", t0.elapsed());

    // Resizing: too small says so, and the screen comes back when large again.
    tmux.ok(&["resize-window", "-t", "alice", "-x", "40", "-y", "10"]);
    tmux.wait_for("alice", "Terminal too small");
    tmux.ok(&["resize-window", "-t", "alice", "-x", "100", "-y", "30"]);
    tmux.wait_for("alice", "bob: hi alice, got it");

    // Alice calls bob from the contact list; bob accepts in the ringing popup; both see
    // the live call panel on a direct path, with figures; alice hangs up.
    tmux.keys("alice", &["Escape"]);
    tmux.wait_for("alice", "Message (Tab to type)");
    tmux.keys("alice", &["c"]);
    tmux.wait_for("bob", "alice is calling");
    tmux.keys("bob", &["a"]);
    let direct = |peer: &'static str| {
        move |s: &str| line_with(s, &format!("on call with {peer}")).contains("path: direct")
    };
    tmux.wait(
        "alice",
        "the live call panel on a direct path",
        direct("bob"),
    );
    tmux.wait(
        "bob",
        "the live call panel on a direct path",
        direct("alice"),
    );
    // The figures come once a second; the meters need them.
    for name in ["alice", "bob"] {
        tmux.wait(name, "the call's figures", |s| {
            s.contains("RTT ") && s.contains("mic ") && s.contains("speaker ")
        });
    }
    eprintln!(
        "call up on both screens after {:?}; bob's screen:\n{}",
        t0.elapsed(),
        tmux.screen("bob")
    );
    tmux.keys("alice", &["h"]);
    tmux.wait_for("alice", "call with bob ended");
    let s = tmux.wait_for("bob", "call with alice ended");
    assert!(!s.contains("on call with"), "{s}");
    eprintln!("call over on both screens after {:?}", t0.elapsed());

    // Help, then quit from the contact list: the app exits cleanly, the agent stays up.
    tmux.keys("alice", &["Escape"]);
    tmux.wait_for("alice", "Message (Tab to type)");
    tmux.keys("alice", &["?"]);
    tmux.wait_for("alice", "any key closes this window");
    tmux.keys("alice", &["Escape"]);
    tmux.wait("alice", "help closed", |s| !s.contains("any key closes"));
    // A screen read mid-redraw can look closed before the app has handled the key, and a
    // `q` that reaches the help window only closes it: press `q` again until the app exits.
    let start = Instant::now();
    let mut last_q = None::<Instant>;
    loop {
        if last_q.is_none_or(|t| t.elapsed() > Duration::from_secs(3)) {
            tmux.keys("alice", &["q"]);
            last_q = Some(Instant::now());
        }
        if let Ok(code) = std::fs::read_to_string(&alice_exit) {
            assert_eq!(code.trim(), "0", "alice's app exited with {code}");
            break;
        }
        if start.elapsed() > DEADLINE {
            let ps = Command::new("ps")
                .args(["-eLo", "pid,ppid,stat,wchan:30,cmd"])
                .output()
                .unwrap();
            panic!(
                "alice's app did not exit; it shows:\n{}\n{}",
                tmux.screen("alice"),
                String::from_utf8_lossy(&ps.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = Command::new(peerline_bin())
        .arg("--profile")
        .arg(&alice.0)
        .args(["status", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["online"], true, "the agent should outlive the app: {v}");
    eprintln!("done after {:?}", t0.elapsed());
}

#[test]
fn without_a_terminal_the_app_says_so_in_one_line() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(peerline_bin())
        .arg("--profile")
        .arg(root.path().join("p"))
        .arg("tui")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("needs an interactive terminal"), "{err}");
}
