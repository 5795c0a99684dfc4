//! `overlayd-cni`: the CNI plugin (the protocol is [`overlayd::cni`]). A runtime runs it with the
//! command in `CNI_COMMAND` and the network configuration on stdin; it names the runtime's
//! network namespace under /run/netns, asks the local daemon over its API socket, and prints the
//! result, or a CNI error, on stdout.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use rustix::io::Errno;
use rustix::mount::{UnmountFlags, mount_bind, unmount};
use serde_json::Value;

use overlayd::api::{self, Attachment, Request};
use overlayd::cni::{self, Command, Config, Error, Sandbox, Target, code};

/// Where the attachments' namespace names live (as `ip netns` keeps them).
const NETNS_DIR: &str = "/run/netns";

/// Longest the plugin waits for the daemon: beyond its own bounds on one attach (a Raft
/// proposal, then the host's tools), so a daemon that hangs fails the runtime's call instead of
/// hanging it.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(60);

const HELP: &str =
    "overlayd-cni: the CNI plugin of overlayd (CNI spec 1.0, and GC and STATUS of 1.1).
A container runtime runs it, with CNI_COMMAND (ADD, DEL, CHECK, GC, STATUS, VERSION) and the other
CNI_* variables set and the network configuration on stdin, for example:
  {\"cniVersion\": \"1.0.0\", \"name\": \"pods\", \"plugins\": [{\"type\": \"overlayd-cni\",
   \"network\": \"app\", \"service\": \"web\", \"socket\": \"/run/overlayd.sock\"}]}
network: the overlayd network (required); service: attach as a task of it (optional);
socket: the local daemon's API socket (default /run/overlayd.sock). See docs/cni.md.";

fn main() -> ExitCode {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    let version = cni::answer_version(&stdin);
    let outcome = match read {
        Ok(_) => run(&stdin, &version),
        Err(e) => Err(Error::new(code::IO_FAILURE, "reading stdin", e.to_string())),
    };
    match outcome {
        Ok(answer) => {
            if let Some(answer) = answer {
                println!("{answer}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("{}", err.to_json(&version));
            eprintln!("overlayd-cni: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Carries out the command; what to print on success (ADD's result, VERSION's answer).
fn run(stdin: &[u8], version: &str) -> Result<Option<Value>, Error> {
    let command = Command::from_env(|name| std::env::var(name).ok())?;
    let config = || Config::parse(stdin);
    match command {
        Command::Version => Ok(Some(cni::version_info(version))),
        Command::Add(sandbox) => block_on(add(&config()?, &sandbox)).map(Some),
        Command::Check(sandbox) => block_on(check(&config()?, &sandbox)).map(|()| None),
        Command::Del(target) => block_on(del(&config()?, &target)).map(|()| None),
        Command::Gc => block_on(gc(&config()?)).map(|()| None),
        Command::Status => block_on(status(&config()?)).map(|()| None),
    }
}

fn block_on<T>(work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            Error::new(
                code::IO_FAILURE,
                "starting the plugin's runtime",
                e.to_string(),
            )
        })?
        .block_on(work)
}

/// Names the runtime's namespace, attaches the name, and answers with the result; on failure
/// the name goes again.
async fn add(config: &Config, sandbox: &Sandbox) -> Result<Value, Error> {
    let name = cni::netns_name(&config.name, &sandbox.target);
    bind_name(Path::new(&sandbox.netns), &name)?;
    let request = Request::Attach {
        netns: name.clone(),
        network: config.network.clone(),
        ip: None,
        service: config.service.clone(),
        aliases: sandbox.container_name.iter().cloned().collect(),
        ifname: Some(sandbox.target.ifname.clone()),
    };
    let attached = call(config, "attaching", &request).await.and_then(|v| {
        serde_json::from_value::<Attachment>(v).map_err(|e| {
            Error::new(
                code::IO_FAILURE,
                "reading the daemon's reply",
                e.to_string(),
            )
        })
    });
    match attached {
        Ok(a) => Ok(cni::add_result(&config.version, &sandbox.netns, &a)),
        Err(err) => {
            // The daemon changed nothing, or (no answer in time) holds a plug it can still
            // detach by name: the name itself is not needed for that.
            let _ = unbind_name(&name);
            Err(err)
        }
    }
}

/// The attachment's name exists, the daemon still has the network, and the container's
/// interface has the MAC and addresses of ADD's result.
async fn check(config: &Config, sandbox: &Sandbox) -> Result<(), Error> {
    let ifname = &sandbox.target.ifname;
    let want = cni::expected(config.prev_result.as_ref(), ifname)?;
    let name = cni::netns_name(&config.name, &sandbox.target);
    if !Path::new(NETNS_DIR).join(&name).exists() {
        return Err(Error::new(
            code::UNKNOWN_CONTAINER,
            "the container is not attached",
            format!("{NETNS_DIR}/{name}, which ADD makes, does not exist"),
        ));
    }
    let networks = call(config, "listing networks", &Request::NetworkLs).await?;
    if !networks
        .as_array()
        .is_some_and(|n| n.iter().any(|n| n["name"] == config.network.as_str()))
    {
        return Err(Error::new(
            code::NOT_AS_ATTACHED,
            format!("network {} is gone", config.network),
            "`overlayd network ls` does not list it",
        ));
    }
    let out = tokio::process::Command::new("ip")
        .args(["-n", &name, "-j", "addr", "show", "dev", ifname])
        .output()
        .await
        .map_err(|e| Error::new(code::IO_FAILURE, "running `ip` (iproute2)", e.to_string()))?;
    if !out.status.success() {
        return Err(Error::new(
            code::NOT_AS_ATTACHED,
            format!("the container has no interface {ifname}"),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let link: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::new(code::IO_FAILURE, "reading `ip -j addr`", e.to_string()))?;
    cni::check_link(&want, &link)
}

/// Detaches the attachment and drops its name; an attachment already gone is no error.
async fn del(config: &Config, target: &Target) -> Result<(), Error> {
    let name = cni::netns_name(&config.name, target);
    detach(config, &name).await?;
    unbind_name(&name)
}

/// Detaches and unnames every attachment of this network that the runtime does not list as
/// valid, going on past failures (the first is reported).
async fn gc(config: &Config) -> Result<(), Error> {
    let present: Vec<String> = match std::fs::read_dir(NETNS_DIR) {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io_failure(&format!("listing {NETNS_DIR}"), e)),
    };
    let mut first_failure = None;
    for name in cni::stale(&config.name, &config.valid_attachments, &present) {
        let removed = match detach(config, &name).await {
            Ok(()) => unbind_name(&name),
            Err(err) => Err(err),
        };
        if let Err(err) = removed {
            first_failure.get_or_insert(err);
        }
    }
    first_failure.map_or(Ok(()), Err)
}

/// Ready when the daemon answers.
async fn status(config: &Config) -> Result<(), Error> {
    call(config, "asking its status", &Request::Status)
        .await
        .map(drop)
        .map_err(|err| Error::new(code::NOT_AVAILABLE, err.msg, err.details))
}

async fn detach(config: &Config, name: &str) -> Result<(), Error> {
    let request = Request::Detach {
        netns: name.to_string(),
        network: config.network.clone(),
        missing_ok: true,
    };
    call(config, "detaching", &request).await.map(drop)
}

/// Sends `request` to the daemon, bounded by [`DAEMON_TIMEOUT`].
async fn call(config: &Config, doing: &str, request: &Request) -> Result<Value, Error> {
    let reply = tokio::time::timeout(DAEMON_TIMEOUT, api::call(&config.socket, request))
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "no answer within {DAEMON_TIMEOUT:?} on {}",
                config.socket.display()
            ))
        });
    cni::daemon_reply(doing, reply)
}

/// Names the namespace at `netns` `name` under [`NETNS_DIR`], as `ip netns attach` does: a
/// bind mount, which the daemon sees through its `ip -n NAME`.
fn bind_name(netns: &Path, name: &str) -> Result<(), Error> {
    if !netns.exists() {
        return Err(Error::new(
            code::UNKNOWN_CONTAINER,
            "the container's network namespace does not exist",
            format!("CNI_NETNS is {}", netns.display()),
        ));
    }
    // A name left by an ADD that never got its DEL.
    unbind_name(name)?;
    std::fs::create_dir_all(NETNS_DIR)
        .map_err(|e| io_failure(&format!("making {NETNS_DIR}"), e))?;
    let path = Path::new(NETNS_DIR).join(name);
    std::fs::File::create(&path)
        .map_err(|e| io_failure(&format!("making {}", path.display()), e))?;
    mount_bind(netns, &path).map_err(|e| {
        let _ = std::fs::remove_file(&path);
        io_failure(
            &format!("binding {} to {}", netns.display(), path.display()),
            e.into(),
        )
    })
}

/// Removes the name [`bind_name`] made, if it is there.
fn unbind_name(name: &str) -> Result<(), Error> {
    let path = Path::new(NETNS_DIR).join(name);
    match unmount(&path, UnmountFlags::DETACH) {
        // Not a mount point, or not there at all.
        Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => {}
        Err(e) => {
            return Err(io_failure(
                &format!("unmounting {}", path.display()),
                e.into(),
            ));
        }
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(io_failure(&format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

fn io_failure(doing: &str, err: std::io::Error) -> Error {
    Error::new(code::IO_FAILURE, doing, err.to_string())
}
