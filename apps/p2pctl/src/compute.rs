//! `p2pctl compute offer|withdraw|submit|status|result|cancel|balance|receipts`:
//! compute leasing. Jobs are WebAssembly modules that other nodes run on an
//! input for credits; modules, inputs and results are content items.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use guest_api::{Client, proto};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::{content, print};

/// Compute commands.
#[derive(Debug, Subcommand)]
pub enum ComputeCmd {
    /// Offer this machine to other nodes' jobs, or replace the offer; a
    /// limit left out takes the node's default (256 MiB, 60 s, 10^11 fuel,
    /// 1 credit per million fuel, 1 job at once) (admin).
    Offer {
        /// A job's memory, at most, in MiB.
        #[arg(long, value_name = "N")]
        memory_mib: Option<u64>,
        /// A job's wall-clock time, at most, in seconds.
        #[arg(long, value_name = "N")]
        wall_secs: Option<u64>,
        /// A job's fuel (about one per WebAssembly instruction), at most.
        #[arg(long, value_name = "N")]
        max_fuel: Option<u64>,
        /// Credits per million fuel.
        #[arg(long, value_name = "N")]
        price: Option<u64>,
        /// Jobs run at once.
        #[arg(long, value_name = "N")]
        max_jobs: Option<u32>,
    },
    /// Stop offering this machine to new jobs (admin).
    Withdraw,
    /// Submit a job and follow it until it ends; fails unless it is done.
    Submit {
        /// The module (.wasm or .wat): a content id, or a file to publish
        /// first (`./NAME` for a file named like an id).
        module: String,
        /// The input: a content id, or a file to publish first (default: none).
        #[arg(long, value_name = "ID_OR_FILE")]
        input: Option<String>,
        /// Credits the job may spend, in all.
        #[arg(long, value_name = "N")]
        budget: u64,
        /// Providers that run it and must agree (default: 2).
        #[arg(long, value_name = "N")]
        replicas: Option<u32>,
        /// Print the submitted job and return (follow it with `compute status`).
        #[arg(long)]
        no_wait: bool,
    },
    /// Jobs this node submitted, newest first; or one job and its runs.
    Status {
        /// Job id (or its start).
        job: Option<String>,
    },
    /// Write a done job's result: into FILE with -o, else to standard output.
    Result {
        /// Job id (or its start).
        job: String,
        /// Write the result here.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Cancel a job: its providers stop, and nobody is paid for it.
    Cancel {
        /// Job id (or its start).
        job: String,
    },
    /// This node's credits, as the receipts it holds add them up.
    Balance,
    /// Receipts this node holds, as provider or as requester.
    Receipts {
        /// Most receipts.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// The digits of a content, job or receipt id a table shows (and enough of
/// a job id to name it).
const SHORT_ID: usize = 12;

/// The start of a hex id, or "-" for none.
fn short(id: &str) -> &str {
    match id {
        "" => "-",
        id => id.get(..SHORT_ID).unwrap_or(id),
    }
}

/// The end of a peer id (they all start alike).
fn short_peer(peer: &str) -> &str {
    peer.get(peer.len().saturating_sub(8)..).unwrap_or(peer)
}

/// `id`, or "none".
fn or_none(id: &str) -> &str {
    if id.is_empty() { "none" } else { id }
}

fn offer_json(o: &proto::ComputeOffer) -> serde_json::Value {
    json!({
        "offering": o.offering, "max_memory_bytes": o.max_memory_bytes,
        "max_wall_ms": o.max_wall_ms, "max_fuel": o.max_fuel,
        "price_per_mfuel": o.price_per_mfuel, "max_jobs": o.max_jobs,
    })
}

fn offer_human(o: &proto::ComputeOffer) -> String {
    if !o.offering {
        return "not offering compute".into();
    }
    format!(
        "offering compute\n  memory:    {} MiB per job\n  wall time: {} s per job\n  fuel:      {} per job\n  price:     {} credits per million fuel\n  jobs:      {} at once",
        o.max_memory_bytes >> 20,
        o.max_wall_ms as f64 / 1000.0,
        o.max_fuel,
        o.price_per_mfuel,
        o.max_jobs
    )
}

fn run_json(r: &proto::ComputeRun) -> serde_json::Value {
    json!({
        "provider": r.provider, "state": r.state, "result_id": r.result_id,
        "work_units": r.work_units, "credits": r.credits, "wall_ms": r.wall_ms,
        "error_code": r.error_code, "error": r.error,
    })
}

fn job_json(job: &proto::ComputeJob) -> serde_json::Value {
    json!({
        "job_id": job.job_id, "module_id": job.module_id, "input_id": job.input_id,
        "budget": job.budget, "state": job.state, "result_id": job.result_id,
        "credits_spent": job.credits_spent,
        "runs": job.runs.iter().map(run_json).collect::<Vec<_>>(),
        "error_code": job.error_code, "error": job.error,
        "submitted_unix": job.submitted_unix, "elapsed_ms": job.elapsed_ms,
    })
}

/// What went wrong with a job or a run: "CODE: message", or nothing.
fn failure(code: &str, error: &str) -> String {
    match (code, error) {
        ("", e) | (e, "") => e.to_string(),
        (c, e) => format!("{c}: {e}"),
    }
}

/// [`failure`] after ": ", or nothing.
fn why(code: &str, error: &str) -> String {
    match failure(code, error) {
        f if f.is_empty() => f,
        f => format!(": {f}"),
    }
}

/// A job's runs, one provider a line, each line after `indent`.
fn runs_table(runs: &[proto::ComputeRun], indent: &str) -> String {
    let mut s = format!(
        "\n{indent}{:<54} {:<10} {:>12} {:>8} {:>8}  {:<12}  {}",
        "PROVIDER", "STATE", "WORK UNITS", "CREDITS", "TIME", "RESULT", "ERROR"
    );
    for r in runs {
        let time = if r.wall_ms == 0 && r.state == "running" {
            "-".to_owned()
        } else {
            format!("{:.1} s", r.wall_ms as f64 / 1000.0)
        };
        s.push_str(&format!(
            "\n{indent}{:<54} {:<10} {:>12} {:>8} {:>8}  {:<12}  {}",
            r.provider,
            r.state,
            r.work_units,
            r.credits,
            time,
            short(&r.result_id),
            failure(&r.error_code, &r.error)
        ));
    }
    s
}

fn job_human(job: &proto::ComputeJob) -> String {
    let mut s = format!(
        "{}\n  state:   {}{}\n  module:  {}\n  input:   {}\n  budget:  {} credits, {} spent\n  result:  {}\n  elapsed: {:.1} s",
        job.job_id,
        job.state,
        why(&job.error_code, &job.error),
        job.module_id,
        or_none(&job.input_id),
        job.budget,
        job.credits_spent,
        or_none(&job.result_id),
        job.elapsed_ms as f64 / 1000.0
    );
    if !job.runs.is_empty() {
        s.push_str("\n  runs:");
        s.push_str(&runs_table(&job.runs, "    "));
    }
    s
}

fn jobs_table(jobs: &[proto::ComputeJob]) -> String {
    let mut s = format!(
        "{:<12}  {:<10}  {:<12}  {:>8}  {:>4}  {}",
        "JOB", "STATE", "RESULT", "SPENT", "RUNS", "ERROR"
    );
    for job in jobs {
        s.push_str(&format!(
            "\n{:<12}  {:<10}  {:<12}  {:>8}  {:>4}  {}",
            short(&job.job_id),
            job.state,
            short(&job.result_id),
            job.credits_spent,
            job.runs.len(),
            job.error_code
        ));
    }
    s
}

fn receipt_json(r: &proto::ComputeReceipt) -> serde_json::Value {
    json!({
        "receipt_id": r.receipt_id, "job_id": r.job_id, "module_id": r.module_id,
        "input_id": r.input_id, "requester": r.requester, "provider": r.provider,
        "work_units": r.work_units, "credits": r.credits, "result_id": r.result_id,
        "completed_unix": r.completed_unix, "signed": hex::encode(&r.signed),
    })
}

fn receipts_table(receipts: &[proto::ComputeReceipt]) -> String {
    let mut s = format!(
        "{:<12}  {:<12}  {:<8}  {:<9}  {:>12}  {:>8}  {}",
        "RECEIPT", "JOB", "PROVIDER", "REQUESTER", "WORK UNITS", "CREDITS", "RESULT"
    );
    for r in receipts {
        s.push_str(&format!(
            "\n{:<12}  {:<12}  {:<8}  {:<9}  {:>12}  {:>8}  {}",
            short(&r.receipt_id),
            short(&r.job_id),
            short_peer(&r.provider),
            short_peer(&r.requester),
            r.work_units,
            r.credits,
            short(&r.result_id)
        ));
    }
    s
}

/// Whether `s` is a content id: 64 hex digits.
fn is_content_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `arg` as a content id: itself when it is one, else the id of the file
/// it names, published first as `p2pctl publish FILE` would.
async fn content_id(j: bool, c: &Client, arg: &str, what: &str) -> Result<String> {
    if is_content_id(arg) {
        return Ok(arg.to_owned());
    }
    let path = Path::new(arg);
    let file = tokio::fs::File::open(path).await.with_context(|| {
        format!("the {what} {arg:?} is neither a content id (64 hex digits) nor a readable file")
    })?;
    let meta = file.metadata().await?;
    if !meta.is_file() {
        bail!("the {what} {arg:?} is not a file");
    }
    let request = proto::ContentPublishRequest {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rights: Some(proto::ContentRights {
            redistribution_allowed: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let pb = if j {
        ProgressBar::hidden()
    } else {
        content::bar(meta.len(), what)
    };
    let info = c.publish_content(request, pb.wrap_async_read(file)).await;
    pb.finish_and_clear();
    Ok(info
        .with_context(|| format!("publishing the {what} {arg}"))?
        .content_id)
}

/// The whole id of the job `job` names: itself, or the one job id this node
/// lists that starts with it (the tables show the first digits).
async fn job_id(c: &Client, job: &str) -> Result<String> {
    if job.is_empty() {
        bail!("no job id given");
    }
    let jobs = c.compute_status(None).await?;
    if jobs.iter().any(|j| j.job_id == job) {
        return Ok(job.to_owned());
    }
    let mut starting = jobs.iter().filter(|j| j.job_id.starts_with(job));
    match (starting.next(), starting.next()) {
        (Some(one), None) => Ok(one.job_id.clone()),
        (Some(_), Some(_)) => bail!("several jobs' ids start with {job}: give more digits"),
        // Not listed: the node's answer about it says why.
        (None, _) => Ok(job.to_owned()),
    }
}

/// A job's state and each of its runs as `provider:state`.
fn progress(job: &proto::ComputeJob) -> String {
    let mut s = job.state.clone();
    for r in &job.runs {
        s.push_str(&format!(" {}:{}", short_peer(&r.provider), r.state));
    }
    s
}

fn spinner(job_id: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} job {prefix} {elapsed}: {msg}")
            .expect("valid template"),
    );
    pb.set_prefix(short(job_id).to_string());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

pub async fn run(j: bool, c: &Client, cmd: &ComputeCmd) -> Result<()> {
    match cmd {
        ComputeCmd::Offer {
            memory_mib,
            wall_secs,
            max_fuel,
            price,
            max_jobs,
        } => {
            // Zero is "the node's default" for every limit.
            let offer = proto::ComputeOffer {
                offering: true,
                max_memory_bytes: memory_mib.unwrap_or(0).saturating_mul(1 << 20),
                max_wall_ms: wall_secs.unwrap_or(0).saturating_mul(1000),
                max_fuel: max_fuel.unwrap_or(0),
                price_per_mfuel: price.unwrap_or(0),
                max_jobs: max_jobs.unwrap_or(0),
            };
            let o = c.compute_offer(offer).await?;
            print(j, offer_json(&o), || offer_human(&o));
        }
        ComputeCmd::Withdraw => {
            c.compute_withdraw().await?;
            print(j, json!({"offering": false}), || {
                "compute offer withdrawn".into()
            });
        }
        ComputeCmd::Submit {
            module,
            input,
            budget,
            replicas,
            no_wait,
        } => {
            let module_id = content_id(j, c, module, "module").await?;
            let input_id = match input {
                Some(input) => content_id(j, c, input, "input").await?,
                None => String::new(),
            };
            let job = c
                .compute_submit(&module_id, &input_id, *budget, replicas.unwrap_or(0))
                .await?;
            if *no_wait {
                print(j, job_json(&job), || job_human(&job));
                return Ok(());
            }
            let pb = if j {
                ProgressBar::hidden()
            } else {
                spinner(&job.job_id)
            };
            let end = c
                .compute_wait(&job.job_id, |now| pb.set_message(progress(now)))
                .await;
            pb.finish_and_clear();
            let end = end.with_context(|| format!("following job {}", job.job_id))?;
            print(j, job_json(&end), || job_human(&end));
            if end.state != "done" {
                bail!(
                    "job {} {}{}",
                    end.job_id,
                    end.state,
                    why(&end.error_code, &end.error)
                );
            }
        }
        ComputeCmd::Status { job } => {
            let jobs = match job {
                Some(job) => c.compute_status(Some(&job_id(c, job).await?)).await?,
                None => c.compute_status(None).await?,
            };
            print(
                j,
                json!(jobs.iter().map(job_json).collect::<Vec<_>>()),
                || {
                    let mut s = jobs_table(&jobs);
                    // One job asked for: how each provider's run went, too.
                    if let (Some(_), [one]) = (job, &jobs[..])
                        && !one.runs.is_empty()
                    {
                        s.push_str("\nruns:");
                        s.push_str(&runs_table(&one.runs, "  "));
                    }
                    s
                },
            );
        }
        ComputeCmd::Result { job, output } => {
            let id = job_id(c, job).await?;
            let job = c.compute_job(&id).await?;
            if job.state != "done" || job.result_id.is_empty() {
                bail!(
                    "job {id} is {}{}: no result",
                    job.state,
                    why(&job.error_code, &job.error)
                );
            }
            match output {
                Some(path) => content::get(j, c, &job.result_id, Some(path)).await?,
                None => content::cat(c, &job.result_id, 0, 0, false).await?,
            }
        }
        ComputeCmd::Cancel { job } => {
            let id = job_id(c, job).await?;
            c.compute_cancel(&id).await?;
            print(j, json!({"cancelled": id}), || format!("cancelled {id}"));
        }
        ComputeCmd::Balance => {
            let b = c.compute_balance().await?;
            print(
                j,
                json!({"peer_id": b.peer_id, "balance": b.balance, "earned": b.earned,
                       "spent": b.spent, "receipts": b.receipts, "allowance": b.allowance,
                       "reserved": b.reserved, "available": b.available}),
                || {
                    format!(
                        "peer id:   {}\nbalance:   {} credits\nearned:    {}\nspent:     {}\nreceipts:  {}\nallowance: {}\nreserved:  {} (running jobs)\navailable: {} (the largest budget a new job may have)",
                        b.peer_id,
                        b.balance,
                        b.earned,
                        b.spent,
                        b.receipts,
                        b.allowance,
                        b.reserved,
                        b.available
                    )
                },
            );
        }
        ComputeCmd::Receipts { limit } => {
            let receipts = c.compute_receipts(*limit).await?;
            print(
                j,
                json!(receipts.iter().map(receipt_json).collect::<Vec<_>>()),
                || receipts_table(&receipts),
            );
        }
    }
    Ok(())
}
