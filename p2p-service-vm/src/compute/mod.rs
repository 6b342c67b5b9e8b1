//! Compute leasing: this node runs other nodes' WebAssembly jobs for credits
//! (provider), and has its own jobs run by others (requester).
//!
//! ```text
//!  app ─compute_submit─► ComputeService ─► requester: providers from the DHT
//!                              │              service registry, ranked by the
//!                              │              credit ledger's forecasts
//!                              │           ─► /p2pvm/compute/1 Run on 2 providers
//!                              │           ◄─ results + provider-signed receipts
//!                              │           ─► majority by (result id, work):
//!                              │              countersign and pay the agreeing,
//!                              │              ledger: agreed / disagreed
//!                              └─► Receipts (redb) ─► balance
//!  peer ─Run─► provider: module and input fetched as content (verified,
//!              scanned), p2pvm_compute::Sandbox (fuel, memory, wall time),
//!              output published as content, receipt signed
//! ```
//!
//! Jobs run in the P2P service only, never in the client OS: this module is
//! part of `p2pd`, in the service VM or the sandbox.

mod provider;
mod requester;
pub(crate) mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use p2pvm_compute::{JobId, Receipts, ReceiptsError, Sandbox};
use p2pvm_content::ContentId;
use p2pvm_proto::pb;
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::now_unix;
use crate::content::ContentService;
use crate::context::NodeContext;
use crate::node::{Command, service_key};

/// Why a compute request failed.
#[derive(Debug, thiserror::Error)]
pub enum ComputeServiceError {
    /// A bad argument.
    #[error("{0}")]
    BadRequest(String),
    /// The budget is more than this node may spend now.
    #[error(
        "a budget of {budget} credits is more than this node may spend now ({available}: its allowance of {allowance} plus its balance of {balance}, less {reserved} held by jobs still running)"
    )]
    InsufficientCredit {
        /// The job's budget.
        budget: u64,
        /// What may be spent.
        available: i64,
        /// `compute.allowance`.
        allowance: u64,
        /// Earned minus spent.
        balance: i64,
        /// Budgets of running jobs, not yet spent.
        reserved: u64,
    },
    /// No such job.
    #[error("no job {0}")]
    NotFound(String),
    /// A provider's receipt could not be countersigned.
    #[error("cannot countersign the receipt")]
    Countersign(#[source] p2pvm_compute::ReceiptError),
    /// The job id does not parse.
    #[error("bad job id")]
    BadJobId(#[source] p2pvm_compute::ReceiptError),
    /// The receipt store failed.
    #[error(transparent)]
    Receipts(#[from] ReceiptsError),
    /// The sandbox could not start.
    #[error(transparent)]
    Sandbox(#[from] p2pvm_compute::ComputeError),
    /// A file of the service's own failed.
    #[error("{what}: {source}")]
    Io {
        /// Which.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a receipt is not taken: a provider's that does not check (a protocol
/// violation), or a countersigned one that is not what this node signed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReceiptCheckError {
    /// It does not decode.
    #[error("undecodable receipt: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Its signatures do not check.
    #[error(transparent)]
    Receipt(#[from] p2pvm_compute::ReceiptError),
    /// The provider key it names does not decode.
    #[error("the receipt's provider key: {0}")]
    ProviderKey(#[from] libp2p::identity::DecodingError),
    /// It is for another job, module, input, provider or requester.
    #[error("the receipt is for another job or party")]
    OtherParty,
    /// It charges more than the offer and the fuel given allow.
    #[error(
        "the receipt charges {credits} credits for {fuel} fuel (given {given} at {price} per million)"
    )]
    Overcharged {
        /// Credits charged.
        credits: u64,
        /// Fuel it says was used.
        fuel: u64,
        /// Fuel the run was given.
        given: u64,
        /// The offer's price per million fuel.
        price: u64,
    },
    /// An out-of-fuel receipt names a result or charges other fuel.
    #[error(
        "an out-of-fuel receipt must name no result and charge the {given} fuel given, not {charged}"
    )]
    BadOutOfFuel {
        /// Fuel the run was given.
        given: u64,
        /// Fuel it charges.
        charged: u64,
    },
    /// Its result id is not a content id.
    #[error("the result id is not a content id")]
    BadResultId,
    /// The countersigned receipt is not the one this node signed for the peer.
    #[error("the receipt is not the one this node signed for this peer")]
    NotOurs,
    /// The receipt store failed.
    #[error(transparent)]
    Store(#[from] ReceiptsError),
    /// The receipt store did not answer.
    #[error("the receipt store did not answer: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Offer defaults, for fields left at zero.
const DEFAULT_OFFER: wire::Offer = wire::Offer {
    max_memory_bytes: 256 << 20,
    max_wall_ms: 60_000,
    max_fuel: 100_000_000_000,
    price_per_mfuel: 1,
    max_jobs: 1,
    running: 0,
};
/// Most replicas a job may ask for.
const MAX_REPLICAS: u32 = 5;
/// Jobs kept in the table (finished ones beyond this are forgotten, oldest first).
const MAX_JOBS_KEPT: usize = 1000;

/// A job this node submitted.
#[derive(Debug)]
pub(crate) struct Job {
    pub status: Mutex<pb::ComputeJob>,
    pub cancel: CancellationToken,
    pub started: Instant,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut pb::ComputeJob)) {
        let mut s = self.status.lock().expect("lock");
        f(&mut s);
        s.elapsed_ms = self.started.elapsed().as_millis() as u64;
    }

    fn snapshot(&self) -> pb::ComputeJob {
        let mut s = self.status.lock().expect("lock").clone();
        if !is_terminal(&s.state) {
            s.elapsed_ms = self.started.elapsed().as_millis() as u64;
        }
        s
    }
}

pub(crate) fn is_terminal(state: &str) -> bool {
    matches!(state, "done" | "failed" | "cancelled")
}

pub(crate) struct Inner {
    /// What the whole node shares (identity, node, ledger, tasks, shutdown).
    ctx: NodeContext,
    /// Where modules, inputs and results come from and go to.
    content: ContentService,
    sandbox: Sandbox,
    receipts: Arc<Receipts>,
    offer: Mutex<Option<wire::Offer>>,
    running: AtomicU32,
    jobs: Mutex<HashMap<JobId, Arc<Job>>>,
    dir: PathBuf,
    /// `compute.allowance`: credits this node may spend beyond its earnings.
    allowance: u64,
    /// Fault injection for tests of result validation.
    wrong_results: bool,
}

/// The node's compute service. Cheap to clone.
#[derive(Clone)]
pub struct ComputeService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ComputeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputeService").finish_non_exhaustive()
    }
}

impl ComputeService {
    /// Opens the receipts under `data_dir/compute`, restores the offer in
    /// force and starts serving the compute protocol.
    pub fn start(ctx: NodeContext, content: ContentService) -> Result<Self, ComputeServiceError> {
        let config = &ctx.config.compute;
        let dir = ctx.config.data_dir.join("compute");
        std::fs::create_dir_all(&dir).map_err(|source| ComputeServiceError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let receipts = Arc::new(Receipts::open(&dir.join("receipts.redb"))?);
        let offer = std::fs::read(dir.join("offer.pb"))
            .ok()
            .and_then(|b| wire::Offer::decode(b.as_slice()).ok());
        if config.test_wrong_results {
            warn!("COMPUTE FAULT INJECTION IS ON: this node returns wrong results (tests only)");
        }
        let (allowance, wrong_results) = (config.allowance, config.test_wrong_results);
        let svc = Self {
            inner: Arc::new(Inner {
                ctx,
                content,
                sandbox: Sandbox::new(true)?,
                receipts,
                offer: Mutex::new(offer.clone()),
                running: AtomicU32::new(0),
                jobs: Mutex::new(HashMap::new()),
                dir,
                allowance,
                wrong_results,
            }),
        };
        provider::spawn(svc.clone());
        if offer.is_some() {
            svc.announce(true);
        }
        Ok(svc)
    }

    fn announce(&self, on: bool) {
        let key = service_key(wire::SERVICE);
        let cmd = if on {
            Command::Announce(key)
        } else {
            Command::StopProviding(key)
        };
        let node = self.inner.ctx.node.clone();
        self.inner.ctx.spawn(async move {
            let _ = node.send(cmd).await;
        });
    }

    /// The offer in force, if any, with how many jobs run now.
    pub fn offer(&self) -> Option<wire::Offer> {
        let mut o = self.inner.offer.lock().expect("lock").clone()?;
        o.running = self.inner.running.load(Ordering::Relaxed);
        Some(o)
    }

    /// Offers compute on these terms (zero fields take the defaults), kept
    /// across restarts, and announces it in the service registry.
    pub async fn set_offer(&self, mut o: wire::Offer) -> Result<wire::Offer, ComputeServiceError> {
        let d = DEFAULT_OFFER;
        let or = |v: u64, dv: u64| if v == 0 { dv } else { v };
        o.max_memory_bytes = or(o.max_memory_bytes, d.max_memory_bytes);
        o.max_wall_ms = or(o.max_wall_ms, d.max_wall_ms);
        o.max_fuel = or(o.max_fuel, d.max_fuel);
        o.price_per_mfuel = or(o.price_per_mfuel, d.price_per_mfuel);
        o.max_jobs = if o.max_jobs == 0 {
            d.max_jobs
        } else {
            o.max_jobs
        };
        o.running = 0;
        if o.max_memory_bytes > 4 << 30 || o.max_jobs > 64 {
            return Err(ComputeServiceError::BadRequest(
                "an offer allows at most 4 GiB of memory and 64 jobs at once".into(),
            ));
        }
        self.save_offer(Some(o.clone())).await?;
        *self.inner.offer.lock().expect("lock") = Some(o.clone());
        self.announce(true);
        info!(
            price = o.price_per_mfuel,
            max_fuel = o.max_fuel,
            "offering compute"
        );
        Ok(self.offer().unwrap_or(o))
    }

    /// Stops offering (jobs running now finish).
    pub async fn withdraw(&self) -> Result<(), ComputeServiceError> {
        self.save_offer(None).await?;
        *self.inner.offer.lock().expect("lock") = None;
        self.announce(false);
        Ok(())
    }

    async fn save_offer(&self, o: Option<wire::Offer>) -> Result<(), ComputeServiceError> {
        let path = self.inner.dir.join("offer.pb");
        let r = tokio::task::spawn_blocking(move || match o {
            Some(o) => crate::fsutil::write_private_atomic(&path, &o.encode_to_vec()),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        r.map_err(|source| ComputeServiceError::Io {
            what: "saving the compute offer".into(),
            source,
        })
    }

    /// Submits a job; it runs in the background (see [`Self::status`]).
    pub fn submit(
        &self,
        module_id: &str,
        input_id: &str,
        budget: u64,
        replicas: u32,
    ) -> Result<pb::ComputeJob, ComputeServiceError> {
        let bad = |m: String| ComputeServiceError::BadRequest(m);
        let module: ContentId = module_id
            .parse()
            .map_err(|_| bad(format!("module id {module_id:?} is not a content id")))?;
        let input: Option<ContentId> = if input_id.is_empty() {
            None
        } else {
            Some(
                input_id
                    .parse()
                    .map_err(|_| bad(format!("input id {input_id:?} is not a content id")))?,
            )
        };
        if budget == 0 {
            return Err(bad("a job needs a budget of at least one credit".into()));
        }
        let replicas = if replicas == 0 { 2 } else { replicas };
        if replicas > MAX_REPLICAS {
            return Err(bad(format!("at most {MAX_REPLICAS} replicas")));
        }
        let me = self.inner.ctx.node.peer_id();
        let id = JobId(rand::random());
        let job = Arc::new(Job {
            status: Mutex::new(pb::ComputeJob {
                job_id: id.to_string(),
                module_id: module.to_string(),
                input_id: input.map(|i| i.to_string()).unwrap_or_default(),
                budget,
                state: "finding".into(),
                submitted_unix: now_unix(),
                ..Default::default()
            }),
            cancel: self.inner.ctx.shutdown.child_token(),
            started: Instant::now(),
        });
        {
            // Checked and reserved under one lock: two submits at once
            // cannot both spend the same credit.
            let mut jobs = self.inner.jobs.lock().expect("lock");
            let credit = self.credit(&me, &jobs);
            if i128::from(budget) > i128::from(credit.available) {
                return Err(ComputeServiceError::InsufficientCredit {
                    budget,
                    available: credit.available,
                    allowance: credit.allowance,
                    balance: credit.balance,
                    reserved: credit.reserved,
                });
            }
            if jobs.len() >= MAX_JOBS_KEPT {
                forget_oldest_finished(&mut jobs);
            }
            jobs.insert(id, job.clone());
        }
        let first = job.snapshot();
        let spec = requester::Spec {
            id,
            module,
            input,
            budget,
            replicas,
        };
        let svc = self.clone();
        self.inner
            .ctx
            .spawn(async move { requester::run(svc, spec, job).await });
        Ok(first)
    }

    /// One job, or every job newest first.
    pub fn status(&self, job: Option<&str>) -> Result<Vec<pb::ComputeJob>, ComputeServiceError> {
        let jobs = self.inner.jobs.lock().expect("lock");
        if let Some(j) = job {
            let id = parse_job(j)?;
            let job = jobs
                .get(&id)
                .ok_or_else(|| ComputeServiceError::NotFound(j.into()))?;
            return Ok(vec![job.snapshot()]);
        }
        let mut all: Vec<pb::ComputeJob> = jobs.values().map(|j| j.snapshot()).collect();
        all.sort_by_key(|j| std::cmp::Reverse(j.submitted_unix));
        Ok(all)
    }

    /// Cancels a job: its runs' streams close, which stops them at the providers.
    pub fn cancel(&self, job: &str) -> Result<(), ComputeServiceError> {
        let id = parse_job(job)?;
        let jobs = self.inner.jobs.lock().expect("lock");
        let j = jobs
            .get(&id)
            .ok_or_else(|| ComputeServiceError::NotFound(job.into()))?;
        j.cancel.cancel();
        Ok(())
    }

    /// What this node may spend on new jobs, given the jobs in `jobs`.
    fn credit(&self, me: &libp2p::PeerId, jobs: &HashMap<JobId, Arc<Job>>) -> Credit {
        let b = self.inner.receipts.balance(me);
        // A running job's budget is held until it ends; what it has paid so
        // far is in the receipts already.
        let reserved: u64 = jobs
            .values()
            .map(|j| j.status.lock().expect("lock").clone())
            .filter(|s| !is_terminal(&s.state))
            .map(|s| s.budget.saturating_sub(s.credits_spent))
            .fold(0u64, u64::saturating_add);
        let balance = b.net();
        let available =
            i128::from(self.inner.allowance) + i128::from(balance) - i128::from(reserved);
        Credit {
            allowance: self.inner.allowance,
            balance,
            reserved,
            available: available.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            earned: b.earned,
            spent: b.spent,
            receipts: b.receipts,
        }
    }

    /// This node's balance from the receipts it holds, and what it may
    /// spend.
    pub async fn balance(&self) -> pb::ComputeBalance {
        let me = self.inner.ctx.node.peer_id();
        let c = {
            let jobs = self.inner.jobs.lock().expect("lock");
            self.credit(&me, &jobs)
        };
        pb::ComputeBalance {
            peer_id: me.to_base58(),
            balance: c.balance,
            earned: c.earned,
            spent: c.spent,
            receipts: c.receipts,
            allowance: c.allowance,
            reserved: c.reserved,
            available: c.available,
        }
    }

    /// The newest receipts held.
    pub fn receipts(&self, limit: usize) -> Vec<pb::ComputeReceipt> {
        self.inner
            .receipts
            .list(limit)
            .into_iter()
            .map(|r| pb::ComputeReceipt {
                receipt_id: r.id_hex(),
                job_id: r.job.to_string(),
                module_id: r.body.module_id.clone(),
                input_id: r.body.input_id.clone(),
                requester: r.requester.to_base58(),
                provider: r.provider.to_base58(),
                work_units: r.body.work_units,
                credits: r.body.credits,
                result_id: r.body.result_id.clone(),
                completed_unix: r.body.completed_unix,
                signed: r.signed.encode_to_vec().into(),
            })
            .collect()
    }
}

/// What this node may spend: its allowance plus its balance, less what its
/// running jobs hold.
struct Credit {
    allowance: u64,
    balance: i64,
    reserved: u64,
    available: i64,
    earned: u64,
    spent: u64,
    receipts: u64,
}

fn parse_job(s: &str) -> Result<JobId, ComputeServiceError> {
    s.parse().map_err(ComputeServiceError::BadJobId)
}

fn forget_oldest_finished(jobs: &mut HashMap<JobId, Arc<Job>>) {
    let oldest = jobs
        .iter()
        .filter(|(_, j)| is_terminal(&j.status.lock().expect("lock").state))
        .min_by_key(|(_, j)| j.started)
        .map(|(id, _)| *id);
    if let Some(id) = oldest {
        jobs.remove(&id);
    }
}
