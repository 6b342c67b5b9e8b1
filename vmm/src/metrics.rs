//! Per-VM figures, as Firecracker keeps them: each VM's process counts
//! (vCPU exits by reason, interrupts it raised and queue notifications it
//! took, per device) and writes a snapshot every half second to
//! `<home>/vms/<name>/figures.json`; the supervisor (`p2pvmm up --metrics
//! ADDR`) adds what only it knows (state, restarts) and serves them all in
//! Prometheus' text format at `GET /metrics`, and as JSON at `GET /vms.json`
//! (what the service VM's dashboard shows on its VMs page).
//!
//! ```text
//!  vCPU threads ── ExitCounts ─┐
//!  virtio devices ── DeviceStats ┼─► runner (every 0.5 s) ─► figures.json
//!                                                             │
//!  p2pvmm up: Managed (state, restarts) ──┬──────────────────┘
//!                                         └─► GET /metrics, GET /vms.json
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

/// What one device did, counted where it happens (hot paths: one relaxed
/// add each).
#[derive(Debug, Default)]
pub struct DeviceStats {
    /// Times the device was woken to look at a queue (the guest's kicks;
    /// several kicks in a row may wake it once).
    pub notifications: AtomicU64,
    /// Interrupts the device raised in the guest.
    pub interrupts: AtomicU64,
    /// Payload bytes the device gave the guest (packets received, blocks read).
    pub bytes_to_guest: AtomicU64,
    /// Payload bytes it took from the guest (packets sent, blocks written).
    pub bytes_from_guest: AtomicU64,
}

impl DeviceStats {
    /// The counts now.
    pub fn figures(&self, device: &str) -> DeviceFigures {
        DeviceFigures {
            device: device.to_owned(),
            notifications: self.notifications.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
            bytes_to_guest: self.bytes_to_guest.load(Ordering::Relaxed),
            bytes_from_guest: self.bytes_from_guest.load(Ordering::Relaxed),
        }
    }
}

/// One device's counts in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFigures {
    /// `virtio-net`, `virtio-blk`, `virtio-rng`, ...
    pub device: String,
    /// Queue notifications taken.
    pub notifications: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Payload bytes given to the guest.
    #[serde(default)]
    pub bytes_to_guest: u64,
    /// Payload bytes taken from the guest.
    #[serde(default)]
    pub bytes_from_guest: u64,
}

/// A VM process's snapshot (`figures.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    /// Boots in this process (1 + guest reboots).
    pub boots: u32,
    /// vCPU exits in the current boot, by reason.
    pub exits: BTreeMap<String, u64>,
    /// Per device, in the current boot.
    pub devices: Vec<DeviceFigures>,
    /// Guest RAM.
    pub guest_memory_bytes: u64,
    /// The VMM's resident memory beyond guest RAM (largest seen).
    pub vmm_overhead_bytes: u64,
    /// Seconds since the current boot started.
    pub uptime_secs: u64,
}

impl Figures {
    /// Writes the snapshot to `path` (whole or not at all: a reader never
    /// sees half of one).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(tmp, path)
    }

    /// The snapshot at `path`, if there is a readable one.
    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// Where a VM's process writes its figures, and what it adds to them.
#[derive(Debug, Clone)]
pub struct FigureSink {
    /// `figures.json` in the VM's directory.
    pub path: std::path::PathBuf,
    /// Boots so far in this process.
    pub boots: u32,
    /// Guest RAM.
    pub guest_memory_bytes: u64,
}

/// One VM as the supervisor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The VM's name.
    pub name: String,
    /// `running`, `restarting` (backing off after a failure) or `off`.
    pub state: String,
    /// Times the supervisor started it again after a failure.
    pub restarts: u32,
    /// Guest RAM configured.
    pub memory_mib: u64,
    /// How to reach its console.
    pub console: String,
    /// Its process's latest snapshot (none before its first).
    pub figures: Option<Figures>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Vm {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmReason {
    vm: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmDevice {
    vm: String,
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmDeviceDirection {
    vm: String,
    device: String,
    direction: &'static str,
}

/// Every VM's figures in Prometheus' text format.
pub fn encode(vms: &[VmStatus]) -> Result<String, std::fmt::Error> {
    let up = Family::<Vm, Gauge>::default();
    let restarts = Family::<Vm, Counter>::default();
    let boots = Family::<Vm, Counter>::default();
    let memory = Family::<Vm, Gauge>::default();
    let overhead = Family::<Vm, Gauge>::default();
    let exits = Family::<VmReason, Counter>::default();
    let notifications = Family::<VmDevice, Counter>::default();
    let interrupts = Family::<VmDevice, Counter>::default();
    let bytes = Family::<VmDeviceDirection, Counter>::default();
    for v in vms {
        let vm = Vm { vm: v.name.clone() };
        up.get_or_create(&vm).set(i64::from(v.state == "running"));
        restarts.get_or_create(&vm).inc_by(u64::from(v.restarts));
        memory
            .get_or_create(&vm)
            .set((v.memory_mib << 20).try_into().unwrap_or(i64::MAX));
        let Some(f) = &v.figures else { continue };
        boots.get_or_create(&vm).inc_by(u64::from(f.boots));
        overhead
            .get_or_create(&vm)
            .set(f.vmm_overhead_bytes.try_into().unwrap_or(i64::MAX));
        for (reason, n) in &f.exits {
            exits
                .get_or_create(&VmReason {
                    vm: v.name.clone(),
                    reason: reason.clone(),
                })
                .inc_by(*n);
        }
        for d in &f.devices {
            let l = VmDevice {
                vm: v.name.clone(),
                device: d.device.clone(),
            };
            notifications.get_or_create(&l).inc_by(d.notifications);
            interrupts.get_or_create(&l).inc_by(d.interrupts);
            for (direction, n) in [
                ("to_guest", d.bytes_to_guest),
                ("from_guest", d.bytes_from_guest),
            ] {
                bytes
                    .get_or_create(&VmDeviceDirection {
                        vm: v.name.clone(),
                        device: d.device.clone(),
                        direction,
                    })
                    .inc_by(n);
            }
        }
    }
    let mut r = Registry::with_prefix("p2pvmm");
    r.register("vm_up", "Whether the VM runs now (1) or not (0)", up);
    r.register(
        "vm_restarts",
        "Times the supervisor started the VM again after a failure",
        restarts,
    );
    r.register(
        "vm_boots",
        "Boots of the VM in its current process (1 + guest reboots)",
        boots,
    );
    r.register("guest_memory_bytes", "Guest RAM configured", memory);
    r.register(
        "vmm_overhead_bytes",
        "The VMM process's resident memory beyond guest RAM (largest seen)",
        overhead,
    );
    r.register(
        "vcpu_exits",
        "vCPU exits to the VMM in the current boot, by reason",
        exits,
    );
    r.register(
        "virtio_notifications",
        "Queue notifications a device took from its guest in the current boot",
        notifications,
    );
    r.register(
        "interrupts",
        "Interrupts a device raised in its guest in the current boot",
        interrupts,
    );
    r.register(
        "virtio_bytes",
        "Payload bytes a device moved to or from its guest in the current boot",
        bytes,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r)?;
    Ok(out)
}

/// The supervisor's view of its VMs, updated as it polls them.
pub type Board = std::sync::Arc<std::sync::Mutex<Vec<VmStatus>>>;

/// Connections served at once (a Prometheus server, the service VM's
/// dashboard, a person with curl).
const MAX_CONNECTIONS: usize = 8;
/// Connections one client address may hold (the service VM is one client on
/// the TAP: it cannot take the host's places).
const PER_CLIENT: usize = 4;
/// How long an answer is reused: the figures change every half second, and
/// a client asking in a tight loop (the service VM, say) then costs a copy,
/// not a fresh read and encoding each time.
const REUSE: std::time::Duration = std::time::Duration::from_millis(500);
/// The most read of the front-end's figures file (a few hundred bytes).
const FRONTEND_MAX: u64 = 64 << 10;
/// The front-end's families: nothing else of its file is served.
const FRONTEND_PREFIX: &str = "p2pvm_frontend_channel_";

/// What the figures server reads besides the board.
#[derive(Debug, Clone)]
pub enum Sources {
    /// VM mode: each running VM's `figures.json` under this home.
    Vms(std::path::PathBuf),
    /// The sandbox backend: the front-end's figures file.
    Sandbox {
        /// `p2p-frontend --figures`.
        frontend: std::path::PathBuf,
    },
}

/// Serves `GET /metrics` and `GET /vms.json` on `listener` until
/// `shutdown`, from `board` and `sources`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    board: Board,
    sources: Sources,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/vms.json", get(vms_json))
        .with_state(ServerState {
            board,
            sources: std::sync::Arc::new(sources),
            metrics: Default::default(),
            json: Default::default(),
        });
    let limits = p2pvm_httpd::Limits {
        connections: MAX_CONNECTIONS,
        header_read: std::time::Duration::from_secs(10),
        stall: std::time::Duration::from_secs(30),
        lifetime: Some(std::time::Duration::from_secs(120)),
        per_client: PER_CLIENT,
    };
    p2pvm_httpd::serve(listener, app, limits, "p2pvmm metrics", shutdown).await;
}

/// An answer and when it was made.
type Reused = std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>;

#[derive(Clone)]
struct ServerState {
    board: Board,
    sources: std::sync::Arc<Sources>,
    metrics: Reused,
    json: Reused,
}

/// The board with each running VM's latest figures read in.
fn snapshot(board: &Board, sources: &Sources) -> Vec<VmStatus> {
    let mut vms = board.lock().expect("lock").clone();
    if let Sources::Vms(home) = sources {
        for v in &mut vms {
            if v.state == "running" {
                v.figures = Figures::read(&crate::vm_dir::VmDir::new(home, &v.name).figures());
            }
        }
    }
    vms
}

/// The front-end's own families from its file (bounded; anything else in it
/// is dropped), while it runs.
fn frontend_text(board: &Board, path: &std::path::Path) -> String {
    use std::io::Read;
    let running = board
        .lock()
        .expect("lock")
        .iter()
        .any(|v| v.name == "front-end" && v.state == "running");
    let mut raw = String::new();
    if running && let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(FRONTEND_MAX).read_to_string(&mut raw);
    }
    raw.lines()
        .filter(|l| {
            l.starts_with(FRONTEND_PREFIX)
                || l.strip_prefix("# HELP ")
                    .or_else(|| l.strip_prefix("# TYPE "))
                    .is_some_and(|rest| rest.starts_with(FRONTEND_PREFIX))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn render_metrics(s: &ServerState) -> Result<String, std::fmt::Error> {
    let mut text = encode(&snapshot(&s.board, &s.sources))?;
    if let Sources::Sandbox { frontend } = s.sources.as_ref() {
        // Its families are its own; one end-of-exposition line.
        text = text.trim_end().trim_end_matches("# EOF").to_owned();
        text.push_str(&frontend_text(&s.board, frontend));
        text.push_str("# EOF\n");
    }
    Ok(text)
}

/// The answer in `cache` if it is fresh, else `make`'s (kept for next time).
fn reuse(cache: &Reused, make: impl FnOnce() -> Option<String>) -> Option<String> {
    let mut c = cache.lock().expect("lock");
    if let Some((at, text)) = c.as_ref()
        && at.elapsed() < REUSE
    {
        return Some(text.clone());
    }
    let text = make()?;
    *c = Some((std::time::Instant::now(), text.clone()));
    Some(text)
}

async fn scrape(
    axum::extract::State(s): axum::extract::State<ServerState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let text =
        tokio::task::spawn_blocking(move || reuse(&s.metrics, || render_metrics(&s).ok())).await;
    match text {
        Ok(Some(text)) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn vms_json(
    axum::extract::State(s): axum::extract::State<ServerState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let json = tokio::task::spawn_blocking(move || {
        reuse(&s.json, || {
            serde_json::to_string(&snapshot(&s.board, &s.sources)).ok()
        })
    })
    .await;
    match json {
        Ok(Some(json)) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            json,
        )
            .into_response(),
        _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, figures: Option<Figures>) -> VmStatus {
        VmStatus {
            name: name.into(),
            state: "running".into(),
            restarts: 2,
            memory_mib: 256,
            console: format!("p2pvmm console {name}"),
            figures,
        }
    }

    #[test]
    fn figures_survive_the_file_and_every_family_is_encoded_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = Figures {
            boots: 1,
            exits: [("io".to_string(), 40), ("mmio".to_string(), 7)].into(),
            devices: vec![DeviceFigures {
                device: "virtio-net".into(),
                notifications: 5,
                interrupts: 9,
                bytes_to_guest: 1500,
                bytes_from_guest: 60,
            }],
            guest_memory_bytes: 256 << 20,
            vmm_overhead_bytes: 12 << 20,
            uptime_secs: 3,
        };
        let path = dir.path().join("figures.json");
        f.write(&path).unwrap();
        assert_eq!(Figures::read(&path), Some(f.clone()));
        assert_eq!(Figures::read(&dir.path().join("none.json")), None);

        let text = encode(&[status("service", Some(f)), status("client", None)]).unwrap();
        for line in [
            "p2pvmm_vm_up{vm=\"service\"} 1",
            "p2pvmm_vm_restarts_total{vm=\"client\"} 2",
            "p2pvmm_vcpu_exits_total{vm=\"service\",reason=\"io\"} 40",
            "p2pvmm_virtio_notifications_total{vm=\"service\",device=\"virtio-net\"} 5",
            "p2pvmm_interrupts_total{vm=\"service\",device=\"virtio-net\"} 9",
            "p2pvmm_virtio_bytes_total{vm=\"service\",device=\"virtio-net\",direction=\"to_guest\"} 1500",
            "p2pvmm_guest_memory_bytes{vm=\"client\"} 268435456",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        assert_eq!(text.matches("# TYPE p2pvmm_vcpu_exits counter").count(), 1);
    }

    #[test]
    fn only_the_front_ends_own_families_are_taken_from_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("frontend.prom");
        std::fs::write(
            &path,
            "# HELP p2pvm_frontend_channel_doorbells x\n# TYPE p2pvm_frontend_channel_doorbells counter\n\
             p2pvm_frontend_channel_doorbells_total 7\np2pvmm_vm_up{vm=\"service\"} 1\n# EOF\n",
        )
        .unwrap();
        let mut front = status("front-end", None);
        let board = Board::default();
        board.lock().unwrap().push(front.clone());
        let text = frontend_text(&board, &path);
        assert_eq!(
            text,
            "# HELP p2pvm_frontend_channel_doorbells x\n# TYPE p2pvm_frontend_channel_doorbells counter\n\
             p2pvm_frontend_channel_doorbells_total 7\n"
        );
        front.state = "restarting".into();
        *board.lock().unwrap() = vec![front];
        assert_eq!(
            frontend_text(&board, &path),
            "",
            "a stale file while it is down"
        );
    }
}
