//! Compute speed of a metered job against the same code run natively, in
//! the same run: the example hash chain (`examples/compute/hashchain.wat`)
//! on 1 MiB of data, against `reference::hashchain` compiled by rustc.
//!
//! Also measured: the same module with fuel metering off (what metering
//! costs), and in wasmi, an interpreter (why the engine is wasmtime).
//!
//! `cargo bench -p p2pvm-compute --bench compute` (`COMPUTE_BENCH_ROUNDS`:
//! hash rounds per run, default 400; `COMPUTE_BENCH_REPEATS`: runs per
//! engine per round, default 3; three rounds). Prints per round the median
//! wall time and thread CPU seconds per engine and the ratios; then the
//! ranges over rounds, and the load average before and after. Without
//! `--bench` (as `cargo test --all-targets` runs it) it is a smoke run: two
//! hash rounds over 64 KiB, once, checking every engine's answer only.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use cpu_time::ThreadTime;
use p2pvm_compute::reference::{HASHCHAIN_WAT, hashchain, hashchain_input};
use p2pvm_compute::{Limits, Sandbox};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median wall time and CPU time of `repeats` runs of `f`, which must give
/// `expect`.
fn measure(repeats: u64, expect: &str, mut f: impl FnMut() -> String) -> (Duration, Duration) {
    let mut walls = Vec::new();
    let mut cpus = Vec::new();
    for _ in 0..repeats {
        let (t, c) = (Instant::now(), ThreadTime::now());
        let out = f();
        walls.push(t.elapsed());
        cpus.push(c.elapsed());
        assert_eq!(out, expect, "an engine computed something else");
    }
    walls.sort();
    cpus.sort();
    (walls[walls.len() / 2], cpus[cpus.len() / 2])
}

fn wasmtime_runner(metered: bool, input: Arc<Vec<u8>>) -> impl FnMut() -> String {
    let sandbox = Sandbox::new(metered).expect("sandbox");
    let program = sandbox.compile(HASHCHAIN_WAT.as_bytes()).expect("compiles");
    move || {
        let out = sandbox
            .run(
                &program,
                input.clone(),
                &Limits::default(),
                Arc::new(AtomicBool::new(false)),
            )
            .expect("runs");
        String::from_utf8(out.output).expect("hex")
    }
}

/// The same host API in wasmi (an interpreter), for comparison only.
fn wasmi_runner(input: Arc<Vec<u8>>) -> impl FnMut() -> String {
    use wasmi::{Caller, Engine, Extern, Linker, Module, Store};
    struct Host {
        input: Arc<Vec<u8>>,
        output: Vec<u8>,
    }
    let engine = Engine::default();
    let module = Module::new(&engine, HASHCHAIN_WAT.as_bytes()).expect("wasmi compiles");
    let mut linker = Linker::<Host>::new(&engine);
    linker
        .func_wrap("p2pvm", "input_len", |c: Caller<'_, Host>| {
            c.data().input.len() as i64
        })
        .expect("link");
    linker
        .func_wrap(
            "p2pvm",
            "input_read",
            |mut c: Caller<'_, Host>, dst: i32, offset: i64, len: i32| -> i32 {
                let input = c.data().input.clone();
                let Some(Extern::Memory(m)) = c.get_export("memory") else {
                    return -1;
                };
                let from = (offset as usize).min(input.len());
                let n = (len as usize).min(input.len() - from);
                m.write(&mut c, dst as usize, &input[from..from + n])
                    .map(|_| n as i32)
                    .unwrap_or(-1)
            },
        )
        .expect("link");
    linker
        .func_wrap(
            "p2pvm",
            "output_write",
            |mut c: Caller<'_, Host>, src: i32, len: i32| -> i32 {
                let Some(Extern::Memory(m)) = c.get_export("memory") else {
                    return -1;
                };
                let mut buf = vec![0u8; len as usize];
                if m.read(&c, src as usize, &mut buf).is_err() {
                    return -1;
                }
                c.data_mut().output.extend_from_slice(&buf);
                0
            },
        )
        .expect("link");
    move || {
        let mut store = Store::new(
            &engine,
            Host {
                input: input.clone(),
                output: Vec::new(),
            },
        );
        let instance = linker
            .instantiate_and_start(&mut store, &module)
            .expect("instantiates");
        let run = instance
            .get_typed_func::<(), i32>(&store, "run")
            .expect("run");
        assert_eq!(run.call(&mut store, ()).expect("runs"), 0);
        String::from_utf8(std::mem::take(&mut store.data_mut().output)).expect("hex")
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}–{hi:.2}")
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = env("COMPUTE_BENCH_ROUNDS", if full { 400 } else { 2 });
    let repeats = if full {
        env("COMPUTE_BENCH_REPEATS", 3).max(1)
    } else {
        1
    };
    let data = if full { 1 << 20 } else { 64 << 10 };
    let input = Arc::new(hashchain_input(rounds, data));
    let expect = hashchain(&input).expect("input has a round count");
    let words = rounds * data as u64 / 8;
    if !full {
        println!("compute bench: SMOKE RUN (no --bench): answers checked, nothing measured");
    }
    println!(
        "compute bench: hash chain, {rounds} rounds over {} KiB ({:.1} M words), {repeats} runs per engine per round",
        data >> 10,
        words as f64 / 1e6
    );
    println!("load average before: {}", loadavg());

    let compile = Instant::now();
    let mut metered = wasmtime_runner(true, input.clone());
    println!(
        "wasmtime compile of the module (Cranelift): {:.1} ms",
        compile.elapsed().as_secs_f64() * 1e3
    );
    let mut unmetered = wasmtime_runner(false, input.clone());
    let mut interp = wasmi_runner(input.clone());
    let fuel = {
        let s = Sandbox::new(true).expect("sandbox");
        let p = s.compile(HASHCHAIN_WAT.as_bytes()).expect("compiles");
        s.run(
            &p,
            input.clone(),
            &Limits::default(),
            Arc::new(AtomicBool::new(false)),
        )
        .expect("runs")
        .fuel_used
    };
    println!(
        "fuel per run: {fuel} ({:.2} per word hashed)",
        fuel as f64 / words as f64
    );

    let (mut vs_native, mut vs_unmetered, mut interp_vs_native) = (vec![], vec![], vec![]);
    for round in 1..=if full { 3 } else { 1 } {
        let native = measure(repeats, &expect, || {
            hashchain(std::hint::black_box(&input)).expect("ok")
        });
        let m = measure(repeats, &expect, &mut metered);
        let u = measure(repeats, &expect, &mut unmetered);
        // The interpreter is slow: one run is enough to place it.
        let i = measure(1, &expect, &mut interp);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "round {round}: native {:7.1} ms ({:.3} CPU s) | wasmtime metered {:7.1} ms ({:.3} CPU s) | unmetered {:7.1} ms ({:.3} CPU s) | wasmi {:7.1} ms ({:.3} CPU s)",
            ms(native.0),
            native.1.as_secs_f64(),
            ms(m.0),
            m.1.as_secs_f64(),
            ms(u.0),
            u.1.as_secs_f64(),
            ms(i.0),
            i.1.as_secs_f64(),
        );
        let r_m = native.0.as_secs_f64() / m.0.as_secs_f64();
        let r_u = u.0.as_secs_f64() / m.0.as_secs_f64();
        let r_i = native.0.as_secs_f64() / i.0.as_secs_f64();
        println!(
            "         metered speed vs native {r_m:.2}x (CPU {:.2}x) | metered vs unmetered {r_u:.2}x | wasmi vs native {r_i:.3}x",
            native.1.as_secs_f64() / m.1.as_secs_f64()
        );
        vs_native.push(r_m);
        vs_unmetered.push(r_u);
        interp_vs_native.push(r_i);
    }
    println!("load average after: {}", loadavg());
    if !full {
        println!(
            "SMOKE RUN: native, wasmtime (metered, unmetered) and wasmi agree; run with --bench to measure"
        );
        return;
    }
    println!(
        "RESULT metered job vs native: {}x (target >= 0.5x); metering keeps {}x of unmetered speed; interpreter (wasmi) {}x native",
        range(&vs_native),
        range(&vs_unmetered),
        range(&interp_vs_native)
    );
}
