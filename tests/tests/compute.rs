//! Compute leasing end to end, with real nodes: jobs run on two providers,
//! both paid by double-signed receipts every node agrees on (and keeps
//! across restarts); a provider that lies is caught, unpaid and loses credit;
//! modules that loop, allocate without bound or import what they may not are
//! stopped or refused with their typed error, and the provider goes on;
//! runs that burn all their fuel are paid for it when the runs agree; a
//! requester spends no more than its allowance and what it earned.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use guest_api::{Client, proto};
use p2pvm_compute::reference::{HASHCHAIN_WAT, hashchain, hashchain_input};
use p2pvm_e2e::{TestNode, eventually, fetch_whole as fetch, node_with, publish_named as publish};

const WAIT: Duration = Duration::from_secs(60);

async fn offer(node: &TestNode, price: u64, extra: proto::ComputeOffer) -> Result<()> {
    let set = node
        .admin()
        .await?
        .compute_offer(proto::ComputeOffer {
            price_per_mfuel: price,
            ..extra
        })
        .await?;
    ensure!(set.offering && set.price_per_mfuel == price, "{set:?}");
    Ok(())
}

/// Waits until `requester` finds `n` compute providers in the registry.
async fn providers(requester: &Client, n: usize) -> Result<()> {
    eventually(
        WAIT,
        "compute providers in the service registry",
        || async {
            let found = requester.find_service("p2pvm-compute").await.ok()?;
            (found.len() >= n).then_some(())
        },
    )
    .await
}

async fn run(c: &Client, module: &str, input: &str, budget: u64) -> Result<proto::ComputeJob> {
    let job = c.compute_submit(module, input, budget, 2).await?;
    ensure!(!job.job_id.is_empty(), "{job:?}");
    let done = tokio::time::timeout(
        Duration::from_secs(180),
        c.compute_wait(&job.job_id, |_| {}),
    )
    .await
    .context("the job did not end")??;
    Ok(done)
}

async fn balance(node: &TestNode) -> Result<proto::ComputeBalance> {
    Ok(node.admin().await?.compute_balance().await?)
}

/// Every receipt a node holds, summed for it: (earned, spent).
async fn from_receipts(node: &TestNode) -> Result<(u64, u64, usize)> {
    let me = node.peer_id.to_string();
    let receipts = node.admin().await?.compute_receipts(1000).await?;
    let earned = receipts
        .iter()
        .filter(|r| r.provider == me)
        .map(|r| r.credits)
        .sum();
    let spent = receipts
        .iter()
        .filter(|r| r.requester == me)
        .map(|r| r.credits)
        .sum();
    Ok((earned, spent, receipts.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_on_two_providers_both_are_paid_and_balances_survive_restarts() -> Result<()> {
    let mut requester = node_with(&[], None).await?;
    let mut p1 = node_with(&[&requester], None).await?;
    let p2 = node_with(&[&requester], None).await?;
    offer(&p1, 2, Default::default()).await?;
    offer(&p2, 3, Default::default()).await?;
    let r = requester.admin().await?;
    providers(&r, 2).await?;

    let input = hashchain_input(400, 64 << 10);
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let input_id = publish(&r, "input.bin", &input).await?;
    let job = run(&r, &module, &input_id, 100_000).await?;
    ensure!(job.state == "done", "{job:?}");
    // The agreed result is the right answer, stored on the requester.
    let out = fetch(&r, &job.result_id).await?;
    ensure!(out == hashchain(&input).unwrap().as_bytes(), "{out:?}");
    ensure!(job.runs.len() == 2, "{job:?}");
    ensure!(job.runs.iter().all(|run| run.state == "agreed"), "{job:?}");
    let work = job.runs[0].work_units;
    ensure!(work > 400 * 8192, "work {work} must reflect the rounds");
    ensure!(
        job.runs.iter().all(|run| run.work_units == work),
        "fuel is exact: {job:?}"
    );
    let paid: u64 = job.runs.iter().map(|run| run.credits).sum();
    ensure!(paid == job.credits_spent && paid > 0, "{job:?}");

    // Balances: the requester spent what the providers earned, and every
    // node's balance is what its own receipts say.
    let credit_of = |peer: &TestNode| {
        job.runs
            .iter()
            .find(|run| run.provider == peer.peer_id)
            .map(|run| run.credits)
            .unwrap_or(0)
    };
    let (c1, c2) = (credit_of(&p1), credit_of(&p2));
    ensure!(
        c1 > 0 && c2 > 0 && c2 > c1,
        "p2 charges more per fuel: {c1} {c2}"
    );
    let check = |b: &proto::ComputeBalance, earned: u64, spent: u64, receipts: u64| {
        ensure!(
            (b.earned, b.spent, b.balance, b.receipts)
                == (earned, spent, earned as i64 - spent as i64, receipts),
            "{b:?}, expected earned {earned} spent {spent}"
        );
        Ok(())
    };
    for _ in 0..2 {
        check(&balance(&requester).await?, 0, c1 + c2, 2)?;
        check(&balance(&p1).await?, c1, 0, 1)?;
        check(&balance(&p2).await?, c2, 0, 1)?;
        for node in [&requester, &p1, &p2] {
            let (earned, spent, n) = from_receipts(node).await?;
            let b = balance(node).await?;
            ensure!((earned, spent, n as u64) == (b.earned, b.spent, b.receipts));
        }
        // Both sides hold the same receipt, byte for byte.
        let ours = requester.admin().await?.compute_receipts(10).await?;
        let theirs = p1.admin().await?.compute_receipts(10).await?;
        ensure!(theirs.len() == 1 && ours.iter().any(|r| r.signed == theirs[0].signed));
        // Restarts keep all of it.
        requester.restart().await?;
        p1.restart().await?;
    }
    // The provider that restarted still offers, and credit went up for both.
    let r = requester.admin().await?;
    for p in [&p1, &p2] {
        let c = r.credit_show(&p.peer_id.to_string()).await?;
        ensure!(c.compute_agreed == 1 && c.compute_disagreed == 0, "{c:?}");
        ensure!(c.expected_fuel_per_sec > 0.0, "a speed forecast: {c:?}");
    }
    Ok(())
}

/// A requester that keeps its items out of the DHT (`content.announce =
/// false`) still gets its jobs run: each provider fetches the module and the
/// input from the requester that sent the job, not through the DHT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_fetch_a_jobs_inputs_from_its_requester_without_the_dht() -> Result<()> {
    let (r_metrics, r_port) = p2pvm_e2e::scrape::config()?;
    let requester = node_with(
        &[],
        Some(format!("{r_metrics}[content]\nannounce = false\n")),
    )
    .await?;
    let (metrics, p1_port) = p2pvm_e2e::scrape::config()?;
    let p1 = node_with(&[&requester], Some(metrics)).await?;
    let p2 = node_with(&[&requester], None).await?;
    let observer = node_with(&[&requester], None).await?;
    offer(&p1, 2, Default::default()).await?;
    offer(&p2, 2, Default::default()).await?;
    let r = requester.admin().await?;
    providers(&r, 2).await?;
    let input = hashchain_input(50, 8 << 10);
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let input_id = publish(&r, "input.bin", &input).await?;

    // The network cannot find the requester's items, by id or by name.
    let o = observer.admin().await?;
    for id in [&module, &input_id] {
        let e = o.content_stat(id).await.expect_err("not in the DHT");
        ensure!(e.code() == Some(proto::ErrorCode::NotFound), "{e}");
    }
    ensure!(o.search_content("hashchain", 10).await?.is_empty());

    let job = run(&r, &module, &input_id, 100_000).await?;
    ensure!(job.state == "done", "{job:?}");
    ensure!(job.runs.iter().all(|run| run.state == "agreed"), "{job:?}");
    ensure!(fetch(&r, &job.result_id).await? == hashchain(&input).unwrap().as_bytes());
    // The provider's figures count the run and the fuel its receipt names.
    let figures = p2pvm_e2e::scrape::Scrape::of(p1_port).await?;
    let p1_runs: Vec<_> = job
        .runs
        .iter()
        .filter(|run| run.provider == p1.peer_id)
        .collect();
    let fuel: u64 = p1_runs.iter().map(|run| run.work_units).sum();
    ensure!(
        figures.get("p2pvm_compute_runs_total{outcome=done}") == p1_runs.len() as f64
            && !p1_runs.is_empty(),
        "p1's runs: {} counted, {} in the job",
        figures.get("p2pvm_compute_runs_total{outcome=done}"),
        p1_runs.len()
    );
    ensure!(
        fuel > 0 && figures.get("p2pvm_compute_fuel_total{}") == fuel as f64,
        "p1's fuel: {} counted, {fuel} on the receipt",
        figures.get("p2pvm_compute_fuel_total{}")
    );
    // The requester's figures count its job and what it paid.
    let mine = p2pvm_e2e::scrape::Scrape::of(r_port).await?;
    ensure!(
        mine.get("p2pvm_compute_jobs_total{outcome=done}") == 1.0
            && job.credits_spent > 0
            && mine.get("p2pvm_compute_credits_spent_total{}") == job.credits_spent as f64,
        "the requester's figures: {} jobs done, {} credits spent; the job paid {}",
        mine.get("p2pvm_compute_jobs_total{outcome=done}"),
        mine.get("p2pvm_compute_credits_spent_total{}"),
        job.credits_spent
    );

    // The providers kept the module and announce it as usual, so the
    // observer's DHT lookups work: only the requester stayed out of them.
    let found = eventually(WAIT, "the providers' records of the module", || async {
        let info = o.content_stat(&module).await.ok()?;
        (!info.providers.is_empty()).then_some(info)
    })
    .await?;
    let (me, kept) = (requester.peer_id.to_string(), [&p1, &p2]);
    ensure!(!found.providers.contains(&me), "{:?}", found.providers);
    ensure!(
        found
            .providers
            .iter()
            .all(|p| kept.iter().any(|n| n.peer_id == *p)),
        "{:?}",
        found.providers
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_returning_a_wrong_result_is_caught_unpaid_and_loses_credit() -> Result<()> {
    let requester = node_with(&[], None).await?;
    let honest1 = node_with(&[&requester], None).await?;
    let honest2 = node_with(&[&requester], None).await?;
    let liar = node_with(
        &[&requester],
        Some("[compute]\ntest_wrong_results = true\n".into()),
    )
    .await?;
    // The liar is the cheapest, so it is among the first two chosen.
    offer(&liar, 1, Default::default()).await?;
    offer(&honest1, 2, Default::default()).await?;
    offer(&honest2, 2, Default::default()).await?;
    let r = requester.admin().await?;
    providers(&r, 3).await?;
    let input = hashchain_input(100, 16 << 10);
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let input_id = publish(&r, "input.bin", &input).await?;
    let before = r.credit_show(&liar.peer_id.to_string()).await?;
    let job = run(&r, &module, &input_id, 100_000).await?;
    ensure!(job.state == "done", "{job:?}");
    ensure!(
        fetch(&r, &job.result_id).await? == hashchain(&input).unwrap().as_bytes(),
        "the majority's answer is the right one"
    );
    let liar_id = liar.peer_id.to_string();
    let lied = job
        .runs
        .iter()
        .find(|run| run.provider == liar_id)
        .context("the cheapest provider ran it")?;
    ensure!(lied.state == "disagreed" && lied.credits == 0, "{job:?}");
    ensure!(job.runs.len() == 3, "a tie-breaker ran: {job:?}");
    ensure!(
        job.runs.iter().filter(|run| run.state == "agreed").count() == 2,
        "{job:?}"
    );
    // Unpaid: the liar holds no receipt, the requester holds none for it.
    ensure!(balance(&liar).await?.receipts == 0);
    ensure!(balance(&liar).await?.earned == 0);
    let receipts = r.compute_receipts(10).await?;
    ensure!(receipts.len() == 2 && receipts.iter().all(|x| x.provider != liar_id));
    // And it lost credit.
    let after = r.credit_show(&liar_id).await?;
    ensure!(after.compute_disagreed == 1, "{after:?}");
    ensure!(after.score < before.score, "{before:?} -> {after:?}");
    for honest in [&honest1, &honest2] {
        let c = r.credit_show(&honest.peer_id.to_string()).await?;
        ensure!(c.compute_agreed == 1 && c.score >= before.score, "{c:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_that_loop_hog_memory_or_import_too_much_fail_typed_and_providers_go_on()
-> Result<()> {
    let requester = node_with(&[], None).await?;
    let limits = proto::ComputeOffer {
        max_memory_bytes: 16 << 20,
        max_wall_ms: 2_000,
        ..Default::default()
    };
    let p1 = node_with(&[&requester], None).await?;
    let p2 = node_with(&[&requester], None).await?;
    offer(&p1, 1, limits).await?;
    offer(&p2, 1, limits).await?;
    let r = requester.admin().await?;
    providers(&r, 2).await?;

    let cases = [
        (
            "loop.wat",
            r#"(module (memory (export "memory") 1)
                 (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#,
            // 30 credits: 10 per run at 1 per million fuel.
            30,
            "COMPUTE_OUT_OF_FUEL",
        ),
        (
            "loop-rich.wat",
            r#"(module (memory (export "memory") 1)
                 (func (export "run") (result i32) (loop $l (br $l)) (i32.const 1)))"#,
            // Fuel for minutes: the providers' 2 s wall clock stops it.
            900_000,
            "COMPUTE_WALL_TIME",
        ),
        (
            "grow.wat",
            r#"(module (memory (export "memory") 1)
                 (func (export "run") (result i32)
                   (loop $l (br_if $l (i32.ge_s (memory.grow (i32.const 16)) (i32.const 0))))
                   (i32.const 0)))"#,
            1_000,
            "COMPUTE_MEMORY_LIMIT",
        ),
        (
            "wasi.wat",
            r#"(module (import "wasi_snapshot_preview1" "proc_exit" (func (param i32)))
                 (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#,
            1_000,
            "COMPUTE_FORBIDDEN_IMPORT",
        ),
        (
            "garbage.wasm",
            "\0asm\u{1}\0\0\0 not really",
            1_000,
            "COMPUTE_INVALID_MODULE",
        ),
    ];
    for (name, module, budget, code) in cases {
        let id = publish(&r, name, module.as_bytes()).await?;
        let job = run(&r, &id, "", budget).await?;
        ensure!(
            job.state == "failed" && job.error_code == code,
            "{name}: {job:?}"
        );
        // A run that burnt all its fuel is paid for it (both agree the job
        // needs more): 10 credits each, what a third of the budget buys.
        let paid = if code == "COMPUTE_OUT_OF_FUEL" { 20 } else { 0 };
        ensure!(
            job.credits_spent == paid && job.result_id.is_empty(),
            "{name}: {job:?}"
        );
        ensure!(
            job.runs.iter().all(|run| run.credits == paid / 2),
            "{name}: {job:?}"
        );
        ensure!(
            job.runs.iter().all(|run| run.error_code == code),
            "{name}: {job:?}"
        );
    }
    // An input larger than the providers' memory is refused from its
    // manifest, before either provider fetches it.
    let big = p2pvm_e2e::pseudo_random(17 << 20, 7);
    let big_id = publish(&r, "big.bin", &big).await?;
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let job = run(&r, &module, &big_id, 1_000).await?;
    ensure!(job.error_code == "COMPUTE_MEMORY_LIMIT", "{job:?}");
    for p in [&p1, &p2] {
        let held = p.admin().await?.content_list().await?;
        ensure!(
            held.iter().all(|c| c.content_id != big_id),
            "fetched anyway"
        );
    }
    // Only the fuel burnt by the looping module was paid, and nobody was
    // blamed for the module's faults.
    let b = balance(&requester).await?;
    ensure!(b.receipts == 2 && b.spent == 20, "{b:?}");
    for p in [&p1, &p2] {
        ensure!(balance(p).await?.earned == 10);
    }
    for p in [&p1, &p2] {
        let c = r.credit_show(&p.peer_id.to_string()).await?;
        ensure!(c.compute_disagreed == 0 && c.violations == 0, "{c:?}");
    }
    // The providers go on serving: a good job right after runs and pays.
    let input = hashchain_input(10, 4096);
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let input_id = publish(&r, "input.bin", &input).await?;
    let job = run(&r, &module, &input_id, 100_000).await?;
    ensure!(job.state == "done", "{job:?}");
    ensure!(fetch(&r, &job.result_id).await? == hashchain(&input).unwrap().as_bytes());
    ensure!(balance(&requester).await?.receipts == 4);
    // A budget too small for any provider is refused by name.
    let job = run(&r, &module, &input_id, 1).await?;
    ensure!(job.error_code == "COMPUTE_NO_PROVIDERS", "{job:?}");
    // Providers whose runs may outlast what the requester waits for one
    // (two hours here) are refused up front, by name, and nothing runs.
    for p in [&p1, &p2] {
        let two_hours = proto::ComputeOffer {
            max_wall_ms: 2 * 3600 * 1000,
            ..Default::default()
        };
        offer(p, 2, two_hours).await?;
    }
    let job = run(&r, &module, &input_id, 100_000).await?;
    ensure!(job.error_code == "COMPUTE_WALL_LIMIT_TOO_LONG", "{job:?}");
    ensure!(job.runs.is_empty(), "{job:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_job_stops_its_runs_at_the_providers() -> Result<()> {
    let requester = node_with(&[], None).await?;
    let p1 = node_with(&[&requester], None).await?;
    let p2 = node_with(&[&requester], None).await?;
    // One job at a time, a minute of wall time: a run that was not stopped
    // keeps its provider busy long after this test's next job.
    for p in [&p1, &p2] {
        offer(p, 1, Default::default()).await?;
    }
    let r = requester.admin().await?;
    providers(&r, 2).await?;
    let forever = r#"(module (memory (export "memory") 1)
        (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    let module = publish(&r, "forever.wat", forever.as_bytes()).await?;
    let job = r.compute_submit(&module, "", 900_000, 2).await?;
    // Both providers are running it (they took the module).
    eventually(WAIT, "both providers running the job", || async {
        let mut fetched = 0;
        for p in [&p1, &p2] {
            let held = p.admin().await.ok()?.content_list().await.ok()?;
            fetched += usize::from(held.iter().any(|c| c.content_id == module));
        }
        (fetched == 2).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.compute_cancel(&job.job_id).await?;
    let ended = tokio::time::timeout(Duration::from_secs(10), r.compute_wait(&job.job_id, |_| {}))
        .await
        .context("cancel did not end the job")??;
    ensure!(
        ended.state == "cancelled" && ended.error_code == "COMPUTE_CANCELLED",
        "{ended:?}"
    );
    ensure!(ended.credits_spent == 0, "{ended:?}");
    // The providers are free again at once: the next job runs on both.
    let input = hashchain_input(5, 1024);
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let input_id = publish(&r, "input.bin", &input).await?;
    let started = std::time::Instant::now();
    let job = run(&r, &module, &input_id, 100_000).await?;
    ensure!(job.state == "done", "{job:?}");
    ensure!(
        started.elapsed() < Duration::from_secs(40),
        "the providers were busy: {:?}",
        started.elapsed()
    );
    Ok(())
}

/// A run that runs out of fuel where the others agree on a result is not
/// paid, nor held against its provider: its offer bought too little fuel
/// for the job (here a thousandth of the others' for the same credits), and
/// a provider could claim as much without running anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_out_of_fuel_where_others_finish_is_neither_paid_nor_blamed() -> Result<()> {
    let requester = node_with(&[], None).await?;
    let cheap1 = node_with(&[&requester], None).await?;
    let cheap2 = node_with(&[&requester], None).await?;
    let dear = node_with(&[&requester], None).await?;
    offer(&cheap1, 1, Default::default()).await?;
    offer(&cheap2, 1, Default::default()).await?;
    offer(&dear, 1000, Default::default()).await?;
    let r = requester.admin().await?;
    providers(&r, 3).await?;
    // About 20 M fuel: within the 100 M a quarter of the budget buys at 1,
    // beyond the 100 k it buys at 1000.
    let input = hashchain_input(100, 64 << 10);
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let input_id = publish(&r, "input.bin", &input).await?;
    let job = r.compute_submit(&module, &input_id, 400, 3).await?;
    let job = tokio::time::timeout(
        Duration::from_secs(180),
        r.compute_wait(&job.job_id, |_| {}),
    )
    .await
    .context("the job did not end")??;
    ensure!(job.state == "done", "{job:?}");
    ensure!(fetch(&r, &job.result_id).await? == hashchain(&input).unwrap().as_bytes());
    let dear_id = dear.peer_id.to_string();
    let ran_out = job
        .runs
        .iter()
        .find(|run| run.provider == dear_id)
        .context("the dear provider ran it")?;
    ensure!(
        ran_out.error_code == "COMPUTE_OUT_OF_FUEL" && ran_out.work_units == 100_000,
        "{job:?}"
    );
    ensure!(ran_out.credits == 0, "paid for a run that ran out: {job:?}");
    let agreed: Vec<_> = job
        .runs
        .iter()
        .filter(|run| run.state == "agreed")
        .collect();
    ensure!(agreed.len() == 2, "{job:?}");
    let work = agreed[0].work_units;
    ensure!(work > 100_000, "{job:?}");
    let spent: u64 = job.runs.iter().map(|run| run.credits).sum();
    ensure!(spent == job.credits_spent && spent <= 400, "{job:?}");
    let d = balance(&dear).await?;
    ensure!(d.earned == 0 && d.receipts == 0, "{d:?}");
    let c = r.credit_show(&dear_id).await?;
    ensure!(c.compute_disagreed == 0 && c.violations == 0, "{c:?}");
    Ok(())
}

/// Spending needs credit: a node spends its allowance plus what it earned,
/// less the budgets its running jobs hold, and the error says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requester_spends_no_more_than_its_allowance_and_earnings() -> Result<()> {
    let broke = node_with(&[], Some("[compute]\nallowance = 0\n".into())).await?;
    let requester = node_with(&[&broke], Some("[compute]\nallowance = 100000\n".into())).await?;
    let p1 = node_with(&[&requester, &broke], None).await?;
    let p2 = node_with(&[&requester, &broke], None).await?;
    offer(&p1, 1, Default::default()).await?;
    offer(&p2, 1, Default::default()).await?;
    // Nothing earned, no allowance: no job, whatever its budget.
    let b = broke.admin().await?;
    let module = publish(&b, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let e = b
        .compute_submit(&module, "", 1, 2)
        .await
        .expect_err("a node without credit submitted a job");
    ensure!(
        e.code() == Some(proto::ErrorCode::ComputeInsufficientCredit),
        "{e}"
    );
    let bb = b.compute_balance().await?;
    ensure!(bb.available == 0 && bb.allowance == 0, "{bb:?}");

    // A running job holds its budget: a second one that does not fit in
    // what is left is refused until the first ends.
    let r = requester.admin().await?;
    providers(&r, 2).await?;
    let forever = r#"(module (memory (export "memory") 1)
        (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;
    let looping = publish(&r, "forever.wat", forever.as_bytes()).await?;
    let first = r.compute_submit(&looping, "", 60_000, 2).await?;
    let held = r.compute_balance().await?;
    ensure!(
        held.reserved == 60_000 && held.available == 40_000,
        "{held:?}"
    );
    let e = r
        .compute_submit(&looping, "", 60_000, 2)
        .await
        .expect_err("spent credit twice");
    ensure!(
        e.code() == Some(proto::ErrorCode::ComputeInsufficientCredit)
            && e.to_string().contains("40000"),
        "{e}"
    );
    r.compute_cancel(&first.job_id).await?;
    tokio::time::timeout(
        Duration::from_secs(30),
        r.compute_wait(&first.job_id, |_| {}),
    )
    .await
    .context("cancel did not end the job")??;
    let free = r.compute_balance().await?;
    ensure!(free.reserved == 0 && free.available == 100_000, "{free:?}");
    // Within what is left, a job runs and is paid; the balance goes below
    // zero by what it spent, no further than the allowance.
    let input = hashchain_input(10, 4096);
    let module = publish(&r, "hashchain.wat", HASHCHAIN_WAT.as_bytes()).await?;
    let input_id = publish(&r, "input.bin", &input).await?;
    let job = run(&r, &module, &input_id, 90_000).await?;
    ensure!(job.state == "done" && job.credits_spent > 0, "{job:?}");
    let after = r.compute_balance().await?;
    ensure!(
        after.balance == -(job.credits_spent as i64)
            && after.available == 100_000 - job.credits_spent as i64,
        "{after:?}"
    );
    Ok(())
}
