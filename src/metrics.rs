//! Prometheus metrics (`--metrics ADDR:PORT`, text format at `/metrics`).
//!
//! Nothing here runs per packet. The data plane and the balancer already count with relaxed
//! atomics; a scrape reads them ([`Sample`], gathered by the daemon) and encodes them with
//! prometheus-client's text encoder, as a collector built for that one scrape. The one thing
//! kept here is the histogram of [`Propagation`], fed by the Raft state machine.
//!
//! The server is a bare HTTP/1 server (hyper) on its own listener: any path but `/metrics`
//! gets 404, a client gets [`crate::http::HEADER_WITHIN`] to send its request.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::debug;

/// The time from a registry change being proposed (on the node where the command was given)
/// to this node's Raft state machine applying it, for changes proposed after this daemon
/// started (a joiner catching up on old entries would measure their age, not the cluster's
/// speed). Every node exports its own; the slowest node's is the time to every node. Both
/// ends read the wall clock, which members keep within [`crate::gossip::FRESH_WITHIN`].
#[derive(Debug)]
pub struct Propagation {
    histogram: Histogram,
    since_ms: u64,
}

impl Propagation {
    pub fn new(now_ms: u64) -> Propagation {
        Propagation {
            // 1 ms to about 16 s.
            histogram: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            since_ms: now_ms,
        }
    }

    /// Records a proposal of `proposed_ms` applied at `now_ms`.
    pub fn applied(&self, proposed_ms: u64, now_ms: u64) {
        if proposed_ms >= self.since_ms {
            self.histogram
                .observe(now_ms.saturating_sub(proposed_ms) as f64 / 1000.0);
        }
    }
}

/// What a scrape reports, read from the daemon's counters and its view at that moment.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Members by state (`ready`, `down`, `leaving`).
    pub members: BTreeMap<String, u64>,
    pub gossip_rounds: u64,
    pub networks: Vec<NetworkSample>,
    /// Every drop of the data plane by reason, networks known or not.
    pub drops: BTreeMap<String, u64>,
    pub tasks: Vec<TaskSample>,
    pub balancer: BalancerSample,
    pub peers: Vec<PeerSample>,
}

#[derive(Clone, Debug, Default)]
pub struct NetworkSample {
    pub name: String,
    pub in_frames: u64,
    pub in_bytes: u64,
    pub out_frames: u64,
    pub out_bytes: u64,
    pub drops: BTreeMap<String, u64>,
}

#[derive(Clone, Debug)]
pub struct TaskSample {
    pub service: String,
    pub task: Ipv4Addr,
    /// The id of the node running it.
    pub node: String,
    /// `starting`, `healthy`, `unhealthy`, `draining` or `down`.
    pub state: String,
    /// New flows this node sent to it (its Maglev choices), through the VIP or a published port.
    pub connections: u64,
    /// Flows this node tracks to it now.
    pub flows: u64,
}

#[derive(Clone, Debug, Default)]
pub struct BalancerSample {
    pub flows: u64,
    pub tracked: u64,
    pub rejected: u64,
    pub dropped: u64,
}

#[derive(Clone, Debug)]
pub struct PeerSample {
    pub vtep: Ipv4Addr,
    pub datagrams: u64,
    /// Seconds since the Unix epoch when its last datagram was taken.
    pub last_seen: Option<f64>,
}

/// Every task state, so that a task's series for the states it is not in read 0.
const TASK_STATES: [&str; 5] = ["starting", "healthy", "unhealthy", "draining", "down"];

impl Collector for Sample {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let mut family = |name: &str, help: &str, kind, rows: Vec<(Vec<(&str, &str)>, f64)>| {
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for (labels, value) in rows {
                let row = metric.encode_family(&labels)?;
                match kind {
                    Counter => ConstCounter::new(value).encode(row)?,
                    _ => ConstGauge::new(value).encode(row)?,
                }
            }
            Ok::<_, std::fmt::Error>(())
        };
        let count = |n: u64| n as f64;
        family(
            "members",
            "Cluster members this node sees, by state.",
            Gauge,
            self.members
                .iter()
                .map(|(state, n)| (vec![("state", state.as_str())], count(*n)))
                .collect(),
        )?;
        family(
            "gossip_rounds",
            "Gossip rounds this node opened (Syn messages sent, one per peer a round picks).",
            Counter,
            vec![(vec![], count(self.gossip_rounds))],
        )?;
        let per_network = |f: fn(&NetworkSample) -> [(&str, u64); 2]| {
            self.networks
                .iter()
                .flat_map(|n| {
                    f(n).map(|(dir, v)| {
                        (
                            vec![("network", n.name.as_str()), ("direction", dir)],
                            count(v),
                        )
                    })
                })
                .collect()
        };
        family(
            "network_frames",
            "Frames of a network: in = sent by containers on this node, out = delivered to them.",
            Counter,
            per_network(|n| [("in", n.in_frames), ("out", n.out_frames)]),
        )?;
        family(
            "network_bytes",
            "Bytes of those frames (Ethernet, no VXLAN).",
            Counter,
            per_network(|n| [("in", n.in_bytes), ("out", n.out_bytes)]),
        )?;
        family(
            "network_drops",
            "Frames of a network the data plane dropped, by reason.",
            Counter,
            self.networks
                .iter()
                .flat_map(|n| {
                    n.drops.iter().map(|(reason, v)| {
                        (
                            vec![("network", n.name.as_str()), ("reason", reason.as_str())],
                            count(*v),
                        )
                    })
                })
                .collect(),
        )?;
        family(
            "dataplane_drops",
            "Every frame or datagram the data plane dropped, by reason, its network known or not.",
            Counter,
            self.drops
                .iter()
                .map(|(reason, v)| (vec![("reason", reason.as_str())], count(*v)))
                .collect(),
        )?;
        let ips: Vec<String> = self.tasks.iter().map(|t| t.task.to_string()).collect();
        fn task_labels<'a>(t: &'a TaskSample, ip: &'a str) -> Vec<(&'static str, &'a str)> {
            vec![("service", &t.service), ("task", ip), ("node", &t.node)]
        }
        let per_task = |f: fn(&TaskSample) -> u64| {
            self.tasks
                .iter()
                .zip(&ips)
                .map(|(t, ip)| (task_labels(t, ip), count(f(t))))
                .collect()
        };
        family(
            "task_connections",
            "New flows this node balanced to a task (its Maglev choices), through the VIP or a published port.",
            Counter,
            per_task(|t| t.connections),
        )?;
        family(
            "task_flows",
            "Flows this node's connection table holds to a task now.",
            Gauge,
            per_task(|t| t.flows),
        )?;
        family(
            "task_health",
            "A task's state as this node sees it: 1 for the state it is in.",
            Gauge,
            self.tasks
                .iter()
                .zip(&ips)
                .flat_map(|(t, ip)| {
                    TASK_STATES.map(|state| {
                        let mut labels = task_labels(t, ip);
                        labels.push(("state", state));
                        (labels, if t.state == state { 1.0 } else { 0.0 })
                    })
                })
                .collect(),
        )?;
        let b = &self.balancer;
        for (name, help, kind, v) in [
            (
                "balancer_flows",
                "Flows balanced to a task since start.",
                Counter,
                b.flows,
            ),
            (
                "balancer_tracked_flows",
                "Flows in the connection table now.",
                Gauge,
                b.tracked,
            ),
            (
                "balancer_rejected",
                "Flows answered with a reset or port unreachable: no task.",
                Counter,
                b.rejected,
            ),
            (
                "balancer_dropped",
                "Packets the balancer dropped.",
                Counter,
                b.dropped,
            ),
        ] {
            family(name, help, kind, vec![(vec![], count(v))])?;
        }
        let vteps: Vec<String> = self.peers.iter().map(|p| p.vtep.to_string()).collect();
        family(
            "peer_vxlan_datagrams",
            "VXLAN datagrams taken from a peer (checked, and opened if sealed).",
            Counter,
            self.peers
                .iter()
                .zip(&vteps)
                .map(|(p, vtep)| (vec![("peer", vtep.as_str())], count(p.datagrams)))
                .collect(),
        )?;
        family(
            "peer_last_seen_timestamp_seconds",
            "When the last VXLAN datagram from a peer was taken (absent: never).",
            Gauge,
            self.peers
                .iter()
                .zip(&vteps)
                .filter_map(|(p, vtep)| Some((vec![("peer", vtep.as_str())], p.last_seen?)))
                .collect(),
        )?;
        Ok(())
    }
}

/// The text a scrape answers: `sample` and the propagation histogram.
pub fn render(sample: Sample, propagation: &Propagation) -> String {
    let mut registry = Registry::with_prefix("overlayd");
    registry.register(
        "registry_apply_delay_seconds",
        "Time from a registry change being proposed to this node applying it.",
        propagation.histogram.clone(),
    );
    registry.register_collector(Box::new(sample));
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// Serves `/metrics` on `listener`, each scrape answered with what `scrape` renders.
pub async fn serve<F, Fut>(listener: Arc<TcpListener>, scrape: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                debug!(%err, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let scrape = scrape.clone();
        tokio::spawn(crate::http::serve_connection(
            stream,
            "metrics",
            move |request| {
                let scrape = scrape.clone();
                async move { answer(request.uri().path(), scrape).await }
            },
        ));
    }
}

async fn answer<F, Fut>(path: &str, scrape: F) -> Response<Full<Bytes>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let (status, body) = if path == "/metrics" {
        (StatusCode::OK, scrape().await)
    } else {
        (
            StatusCode::NOT_FOUND,
            "not found: try /metrics\n".to_owned(),
        )
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// A peer's traffic as a scrape reports it, the instant of its last datagram made wall-clock
/// time.
pub fn peer_sample(vtep: Ipv4Addr, traffic: overlay::PeerTraffic) -> PeerSample {
    let now = (std::time::Instant::now(), std::time::SystemTime::now());
    PeerSample {
        vtep,
        datagrams: traffic.datagrams,
        last_seen: traffic.last_seen.map(|at| {
            let wall = now.1 - now.0.saturating_duration_since(at);
            wall.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name{labels}` in `text`, labels as they are printed.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn a_sample_reads_as_prometheus_text() {
        let sample = Sample {
            members: [("ready".to_owned(), 3)].into(),
            gossip_rounds: 12,
            networks: vec![NetworkSample {
                name: "app".into(),
                in_frames: 5,
                in_bytes: 500,
                drops: [("arp-spoof".to_owned(), 2)].into(),
                ..NetworkSample::default()
            }],
            tasks: vec![TaskSample {
                service: "web".into(),
                task: Ipv4Addr::new(198, 19, 5, 2),
                node: "n1".into(),
                state: "healthy".into(),
                connections: 7,
                flows: 1,
            }],
            peers: vec![PeerSample {
                vtep: Ipv4Addr::new(198, 18, 0, 2),
                datagrams: 9,
                last_seen: None,
            }],
            ..Sample::default()
        };
        let propagation = Propagation::new(1000);
        propagation.applied(1000, 1250);
        propagation.applied(10, 1250); // proposed before this node started: not counted
        let text = render(sample, &propagation);
        let task = r#"service="web",task="198.19.5.2",node="n1""#;
        for (series, want) in [
            (r#"overlayd_members{state="ready"}"#.to_owned(), 3.0),
            ("overlayd_gossip_rounds_total".to_owned(), 12.0),
            (
                r#"overlayd_network_frames_total{network="app",direction="in"}"#.to_owned(),
                5.0,
            ),
            (
                r#"overlayd_network_bytes_total{network="app",direction="in"}"#.to_owned(),
                500.0,
            ),
            (
                r#"overlayd_network_drops_total{network="app",reason="arp-spoof"}"#.to_owned(),
                2.0,
            ),
            (format!("overlayd_task_connections_total{{{task}}}"), 7.0),
            (format!("overlayd_task_flows{{{task}}}"), 1.0),
            (
                format!(r#"overlayd_task_health{{{task},state="healthy"}}"#),
                1.0,
            ),
            (
                format!(r#"overlayd_task_health{{{task},state="down"}}"#),
                0.0,
            ),
            (
                r#"overlayd_peer_vxlan_datagrams_total{peer="198.18.0.2"}"#.to_owned(),
                9.0,
            ),
            (
                "overlayd_registry_apply_delay_seconds_count".to_owned(),
                1.0,
            ),
            ("overlayd_registry_apply_delay_seconds_sum".to_owned(), 0.25),
        ] {
            assert_eq!(value(&text, &series), Some(want), "{series} in\n{text}");
        }
        assert!(
            !text.contains("peer_last_seen_timestamp_seconds{"),
            "{text}"
        );
    }
}
