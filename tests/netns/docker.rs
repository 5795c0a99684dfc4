//! Docker for the tests: the `docker` command, whether a daemon answers, and what a test made
//! in Docker (an image imported from the host's busybox, containers, networks), removed on
//! drop: on success and on panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use super::{CLI_TIMEOUT, run, run_bounded, show};

pub fn docker(args: &[&str]) -> Output {
    run(Command::new("docker").args(args), CLI_TIMEOUT)
}

pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "`docker {}` failed\n{}",
        args.join(" "),
        show(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Why Docker cannot be used here, or `None` if its daemon answers.
pub fn docker_unreachable() -> Option<String> {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("docker").is_file()));
    if !on_path {
        return Some("no `docker` command on PATH".into());
    }
    let out = run_bounded(
        Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]),
        Duration::from_secs(15),
    );
    match out {
        None => Some("`docker version` did not answer within 15 s".into()),
        Some(o) if o.status.success() => None,
        Some(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            Some(format!(
                "`docker version` failed ({}): {}",
                o.status,
                first.trim()
            ))
        }
    }
}

/// What the test made in Docker; removed on drop (success or panic): containers first, then
/// networks (their driver must still run: drop this before the cluster), then the image.
pub struct DockerThings {
    pub image: String,
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub rootfs: PathBuf,
}

impl Drop for DockerThings {
    fn drop(&mut self) {
        for name in &self.containers {
            let _ = run_bounded(
                Command::new("docker").args(["rm", "-f", "-v", name]),
                CLI_TIMEOUT,
            );
        }
        for name in &self.networks {
            let _ = run_bounded(
                Command::new("docker").args(["network", "rm", name]),
                CLI_TIMEOUT,
            );
        }
        let _ = run_bounded(
            Command::new("docker").args(["rmi", "-f", &self.image]),
            CLI_TIMEOUT,
        );
        let _ = fs::remove_dir_all(&self.rootfs);
        let _ = fs::remove_file(self.rootfs.with_extension("tar"));
    }
}

impl DockerThings {
    /// Nothing made yet but the image `<prefix>:busybox`, built in `dir`.
    pub fn new(prefix: &str, dir: &Path) -> DockerThings {
        let things = DockerThings {
            image: format!("{prefix}:busybox"),
            containers: Vec::new(),
            networks: Vec::new(),
            rootfs: dir.join("rootfs"),
        };
        things.build_image();
        things
    }

    /// A busybox-only root filesystem (the binary plus one symlink per applet), imported as
    /// `self.image`.
    fn build_image(&self) {
        let tarball = super::busybox_image_tar(&self.rootfs);
        let import = docker(&["import", &tarball.to_string_lossy(), &self.image]);
        assert!(import.status.success(), "docker import\n{}", show(&import));
    }

    /// Starts `name` (`--network none`, just sleeping) and returns its init's pid.
    pub fn start(&mut self, name: &str) -> u32 {
        self.run(name, &["--network", "none"]);
        let pid = docker_ok(&["inspect", "-f", "{{.State.Pid}}", name]);
        pid.parse()
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or_else(|| panic!("container {name} has no running pid ({pid:?})"))
    }

    /// Runs `name` in the background, just sleeping, with `options` for `docker run` (its
    /// networks); removed on drop.
    pub fn run(&mut self, name: &str, options: &[&str]) {
        let _ = docker(&["rm", "-f", name]);
        self.containers.push(name.to_owned());
        let run = [
            &["run", "-d", "--name", name],
            options,
            &[&self.image, "/bin/sleep", "600"],
        ];
        docker_ok(&run.concat());
    }
}

/// Runs `cmd` with `/bin/sh -c` in container `container`.
pub fn exec(container: &str, cmd: &str) -> Output {
    docker(&["exec", container, "/bin/sh", "-c", cmd])
}
