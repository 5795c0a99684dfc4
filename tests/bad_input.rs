//! Bad input is refused: exit 64, one clear line on stderr, nothing created or changed.
//! Needs root (CI runs as root).
//!
//! All cases run against one cluster and are collected, so one run reports every case that fails.

mod netns;

use std::process::Output;
use std::time::Duration;

use netns::{Cluster, run_bounded, show};

/// Failures collected over all cases.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    /// Checks that `out` (None: still running at its deadline) is a usage refusal: exit 64
    /// (EX_USAGE, STYLE.md: "bad configuration or arguments") and combined output mentioning
    /// one of `mentions` (case-insensitive).
    fn refused(&mut self, case: &str, out: Option<Output>, mentions: &[&str]) {
        self.refused_with(case, out, Some(64), mentions);
    }

    /// Like [`Failures::refused`]; `code` None accepts any non-zero exit code.
    fn refused_with(
        &mut self,
        case: &str,
        out: Option<Output>,
        code: Option<i32>,
        mentions: &[&str],
    ) {
        let Some(out) = out else {
            self.0.push(format!(
                "{case}: did not exit (still running at the deadline)"
            ));
            return;
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lower = text.to_lowercase();
        if out.status.success() {
            self.0.push(format!(
                "{case}: succeeded, expected a refusal\n{}",
                show(&out)
            ));
        } else if out.status.code().is_none() {
            self.0.push(format!(
                "{case}: killed by a signal instead of exiting\n{}",
                show(&out)
            ));
        } else if lower.contains("panicked at") {
            self.0.push(format!(
                "{case}: panicked instead of explaining\n{}",
                show(&out)
            ));
        } else if explanation_lines(&out) != 1 {
            self.0.push(format!(
                "{case}: stderr is not one line (besides a --help hint)\n{}",
                show(&out)
            ));
        } else if !mentions.iter().any(|m| lower.contains(&m.to_lowercase())) {
            self.0.push(format!(
                "{case}: message mentions none of {mentions:?}\n{}",
                show(&out)
            ));
        } else if code.is_some_and(|c| out.status.code() != Some(c)) {
            self.0.push(format!(
                "{case}: exit code {:?}, expected {code:?} (bad input)\n{}",
                out.status.code(),
                show(&out)
            ));
        }
    }

    fn check(&mut self, case: &str, ok: bool, detail: impl FnOnce() -> String) {
        if !ok {
            self.0.push(format!("{case}: {}", detail()));
        }
    }
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_creates_nothing() {
    let c = Cluster::new("bad", 1);
    let n1 = c.node(1);
    let mut f = Failures::default();
    let t = netns::CLI_TIMEOUT;

    n1.cli_ok(&["network", "create", "good", "--subnet", "198.19.1.0/24"]);
    let c1 = c.container(1, "c1");
    let first = c.attach(1, &c1, "good", &[]);
    let c2 = c.container(1, "c2");
    let networks_before = n1.json(&["network", "ls"]);
    let node_links_before = c.links(&n1.netns);
    let unchanged = |f: &mut Failures, case: &str| {
        let networks = n1.json(&["network", "ls"]);
        f.check(case, networks == networks_before, || {
            format!("network ls changed: {networks}")
        });
        let links = c.links(&n1.netns);
        f.check(case, links == node_links_before, || {
            format!("links on the node changed: {node_links_before:?} -> {links:?}")
        });
        f.check(case, c.eth0(&c2).is_none(), || format!("{c2} got an eth0"));
    };

    let case = "attach to an unknown network";
    f.refused(
        case,
        run_bounded(
            &mut n1.cli_command(&["attach", &c2, "--network", "nosuch"]),
            t,
        ),
        &["nosuch"],
    );
    unchanged(&mut f, case);

    let case = "attach an unknown netns";
    let ghost = format!("{}-ghost", c.prefix);
    f.refused(
        case,
        run_bounded(
            &mut n1.cli_command(&["attach", &ghost, "--network", "good"]),
            t,
        ),
        &[&ghost],
    );
    unchanged(&mut f, case);

    let case = "create a network overlapping another";
    let out = run_bounded(
        &mut n1.cli_command(&["network", "create", "other", "--subnet", "198.19.1.128/25"]),
        t,
    );
    f.refused(case, out, &["overlap", "good", "198.19.1.0/24"]);
    unchanged(&mut f, case);

    for bad in ["198.19.300.0/24", "198.19.2.0/33", "banana"] {
        let case = format!("create a network with invalid subnet {bad}");
        f.refused(
            &case,
            run_bounded(
                &mut n1.cli_command(&["network", "create", "inv", "--subnet", bad]),
                t,
            ),
            &[bad],
        );
        unchanged(&mut f, &case);
    }

    for (bad, why) in [("eth/0", "cannot name an interface"), ("lo", "already has")] {
        let case = format!("attach with --ifname {bad}");
        let out = run_bounded(
            &mut n1.cli_command(&["attach", &c2, "--network", "good", "--ifname", bad]),
            t,
        );
        f.refused(&case, out, &[bad, why]);
        unchanged(&mut f, &case);
    }

    let case = "attach with --ip outside the subnet";
    let out = run_bounded(
        &mut n1.cli_command(&["attach", &c2, "--network", "good", "--ip", "198.19.2.5"]),
        t,
    );
    f.refused(case, out, &["198.19.2.5"]);
    unchanged(&mut f, case);

    let case = "attach with --ip already taken";
    let out = run_bounded(
        &mut n1.cli_command(&["attach", &c2, "--network", "good", "--ip", &first.ip]),
        t,
    );
    f.refused(case, out, &[&first.ip]);
    unchanged(&mut f, case);

    let case = "network rm while a container is attached";
    f.refused(
        case,
        run_bounded(&mut n1.cli_command(&["network", "rm", "good"]), t),
        &["attach", &c1],
    );
    unchanged(&mut f, case);
    f.check(
        case,
        c.eth0(&c1).is_some_and(|(ip, _, _)| ip == first.ip),
        || format!("{c1} lost its eth0"),
    );

    // A host on the same switch, without a daemon, for init/join attempts.
    let host = c.host("h", "198.18.0.60");
    let host_links = c.links(&host);

    let case = "second init on a used state dir";
    let token_before = n1.cli_ok(&["join-token"]);
    let state = n1.state_dir.to_string_lossy().into_owned();
    let other_api = c.dir.join("second-init.sock");
    let mut init = netns::overlayd_in(
        &host,
        &[
            "init",
            "--advertise-addr",
            "198.18.0.60",
            "--state-dir",
            &state,
            "--api",
            &other_api.to_string_lossy(),
        ],
    );
    f.refused(
        case,
        run_bounded(&mut init, Duration::from_secs(15)),
        &[&state, "already", "exist"],
    );
    f.check(case, n1.cli_ok(&["join-token"]) == token_before, || {
        "the join token changed".into()
    });
    f.check(case, c.links(&host) == host_links, || {
        format!("links appeared on {host}")
    });

    let case = "join with a wrong token";
    let real = c.token();
    let wrong = wrong_token(&real);
    let join_dir = c.dir.join("joiner-state");
    let mut join = netns::overlayd_in(
        &host,
        &[
            "join",
            &n1.addr,
            "--token",
            &wrong,
            "--advertise-addr",
            "198.18.0.60",
            "--state-dir",
            &join_dir.to_string_lossy(),
            "--api",
            &c.dir.join("joiner.sock").to_string_lossy(),
        ],
    );
    // The token is checked by the peer, so any non-zero exit will do.
    f.refused_with(
        case,
        run_bounded(&mut join, Duration::from_secs(20)),
        None,
        &["token"],
    );
    let members = n1.members();
    f.check(case, members.as_ref().is_ok_and(|m| m.len() == 1), || {
        format!("node ls on node 1: {members:?}")
    });
    f.check(case, c.links(&host) == host_links, || {
        format!("links appeared on {host}")
    });

    // After all that, the next address is still the next one: no refusal leaked an allocation.
    let case = "attach after the refusals";
    let second = c.attach(1, &c2, "good", &[]);
    f.check(case, second.ip == "198.19.1.3", || {
        format!("got {}, expected 198.19.1.3", second.ip)
    });
    // And the refused rm works once nothing is attached.
    n1.cli_ok(&["detach", &c1, "--network", "good"]);
    n1.cli_ok(&["detach", &c2, "--network", "good"]);
    n1.cli_ok(&["network", "rm", "good"]);
    let left = n1.json(&["network", "ls"]);
    f.check(
        "network rm after detach",
        left.as_array().is_some_and(Vec::is_empty),
        || format!("left: {left}"),
    );

    assert!(
        f.0.is_empty(),
        "{} bad-input case(s) failed:\n\n{}",
        f.0.len(),
        f.0.join("\n\n")
    );
}

/// Non-blank stderr lines other than clap's "For more information, try '--help'." hint.
fn explanation_lines(out: &Output) -> usize {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("For more information"))
        .count()
}

/// The real token with its last character changed, so it is well-formed but wrong.
fn wrong_token(real: &str) -> String {
    let mut t: Vec<char> = real.chars().collect();
    match t.last_mut() {
        Some(ch) => *ch = if *ch == '0' { '1' } else { '0' },
        None => t.extend("wrong".chars()),
    }
    t.into_iter().collect()
}
