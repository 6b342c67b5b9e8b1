//! The sandbox with real wasmtime: the example job's output and exact fuel,
//! and every way a job can fail, each with its typed error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use p2pvm_compute::reference::{HASHCHAIN_WAT, hashchain, hashchain_input};
use p2pvm_compute::{ComputeError, Limits, Sandbox};

fn run(
    sandbox: &Sandbox,
    wat: &str,
    input: Vec<u8>,
    limits: Limits,
) -> Result<p2pvm_compute::Outcome, ComputeError> {
    let program = sandbox.compile(wat.as_bytes())?;
    sandbox.run(
        &program,
        Arc::new(input),
        &limits,
        Arc::new(AtomicBool::new(false)),
    )
}

const LOOP_FOREVER: &str = r#"(module (memory (export "memory") 1)
  (func (export "run") (result i32) (loop $l (br $l)) (i32.const 0)))"#;

#[test]
fn the_example_job_matches_native_code_and_its_fuel_is_exact() {
    let sandbox = Sandbox::new(true).unwrap();
    let input = hashchain_input(50, 100_000);
    let a = run(&sandbox, HASHCHAIN_WAT, input.clone(), Limits::default()).unwrap();
    assert_eq!(
        String::from_utf8(a.output.clone()).unwrap(),
        hashchain(&input).unwrap()
    );
    // 50 rounds of 12,500 words: the fuel reflects the work done.
    assert!(a.fuel_used > 50 * 12_500, "fuel {}", a.fuel_used);
    // The same job on another sandbox (another provider) uses exactly the
    // same fuel: receipts from honest providers agree.
    let b = run(
        &Sandbox::new(true).unwrap(),
        HASHCHAIN_WAT,
        input.clone(),
        Limits::default(),
    )
    .unwrap();
    assert_eq!((a.fuel_used, &a.output), (b.fuel_used, &b.output));
    // Twice the rounds, about twice the fuel.
    let c = run(
        &sandbox,
        HASHCHAIN_WAT,
        hashchain_input(100, 100_000),
        Limits::default(),
    )
    .unwrap();
    let ratio = c.fuel_used as f64 / a.fuel_used as f64;
    assert!((1.9..2.1).contains(&ratio), "ratio {ratio}");
    // Unmetered runs give the same answer and report no fuel.
    let d = run(
        &Sandbox::new(false).unwrap(),
        HASHCHAIN_WAT,
        input,
        Limits::default(),
    )
    .unwrap();
    assert_eq!((d.output, d.fuel_used), (a.output, 0));
}

#[test]
fn bad_input_is_the_jobs_own_failure() {
    let sandbox = Sandbox::new(true).unwrap();
    assert_eq!(
        run(&sandbox, HASHCHAIN_WAT, vec![1, 2, 3], Limits::default()),
        Err(ComputeError::Trapped("run returned 1".into()))
    );
}

#[test]
fn a_job_that_loops_forever_stops_at_its_fuel_or_its_wall_time() {
    let metered = Sandbox::new(true).unwrap();
    let limits = Limits {
        fuel: 5_000_000,
        ..Limits::default()
    };
    assert_eq!(
        run(&metered, LOOP_FOREVER, vec![], limits),
        Err(ComputeError::OutOfFuel { limit: 5_000_000 })
    );
    // Unmetered (or with fuel to spare), the wall clock stops it.
    let limits = Limits {
        wall: Duration::from_millis(200),
        ..Limits::default()
    };
    let started = Instant::now();
    assert_eq!(
        run(&Sandbox::new(false).unwrap(), LOOP_FOREVER, vec![], limits),
        Err(ComputeError::WallTime { limit_ms: 200 })
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_job_that_allocates_without_bound_stops_at_its_memory_limit() {
    let grow = r#"(module (memory (export "memory") 1)
      (func (export "run") (result i32)
        (loop $l (br_if $l (i32.ge_s (memory.grow (i32.const 16)) (i32.const 0))))
        (i32.const 0)))"#;
    let limits = Limits {
        memory_bytes: 8 << 20,
        ..Limits::default()
    };
    match run(&Sandbox::new(true).unwrap(), grow, vec![], limits) {
        Err(ComputeError::MemoryLimit { asked, limit }) => {
            assert_eq!(limit, 8 << 20);
            assert!(asked > limit);
        }
        other => panic!("{other:?}"),
    }
    // A module whose initial memory is already too big never starts.
    let huge = r#"(module (memory (export "memory") 1000) (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(matches!(
        run(&Sandbox::new(true).unwrap(), huge, vec![], limits),
        Err(ComputeError::MemoryLimit { .. })
    ));
}

#[test]
fn modules_beyond_the_host_api_are_refused_before_they_run() {
    let sandbox = Sandbox::new(true).unwrap();
    let wasi = r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;
    assert_eq!(
        sandbox.compile(wasi.as_bytes()).unwrap_err(),
        ComputeError::ForbiddenImport {
            module: "wasi_snapshot_preview1".into(),
            name: "fd_write".into()
        }
    );
    let unknown = r#"(module (import "p2pvm" "open_socket" (func)) (memory (export "memory") 1)
      (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(matches!(
        sandbox.compile(unknown.as_bytes()),
        Err(ComputeError::ForbiddenImport { .. })
    ));
    let wrong_type = r#"(module (import "p2pvm" "input_len" (func (result i32))) (memory (export "memory") 1)
      (func (export "run") (result i32) (i32.const 0)))"#;
    assert!(matches!(
        sandbox.compile(wrong_type.as_bytes()),
        Err(ComputeError::InvalidModule(_))
    ));
    let no_run = r#"(module (memory (export "memory") 1))"#;
    assert!(matches!(
        sandbox.compile(no_run.as_bytes()),
        Err(ComputeError::InvalidModule(_))
    ));
    for garbage in [
        &b"\0asm\x01\0\0\0\xff\xff\xff"[..],
        b"",
        b"(module",
        &[0xff; 64],
    ] {
        assert!(
            matches!(
                sandbox.compile(garbage),
                Err(ComputeError::InvalidModule(_))
            ),
            "{garbage:?}"
        );
    }
}

#[test]
fn traps_and_bad_pointers_are_typed_failures() {
    let sandbox = Sandbox::new(true).unwrap();
    let unreachable =
        r#"(module (memory (export "memory") 1) (func (export "run") (result i32) unreachable))"#;
    assert!(matches!(
        run(&sandbox, unreachable, vec![], Limits::default()),
        Err(ComputeError::Trapped(_))
    ));
    let wild_read = r#"(module (import "p2pvm" "input_read" (func $r (param i32 i64 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "run") (result i32) (call $r (i32.const 65530) (i64.const 0) (i32.const 100))))"#;
    assert_eq!(
        run(&sandbox, wild_read, vec![9; 100], Limits::default()),
        Err(ComputeError::Trapped(
            "input_read destination outside memory".into()
        ))
    );
    let flood = r#"(module (import "p2pvm" "output_write" (func $w (param i32 i32) (result i32)))
      (memory (export "memory") 1)
      (func (export "run") (result i32) (loop $l (drop (call $w (i32.const 0) (i32.const 4096))) (br $l)) (i32.const 0)))"#;
    let limits = Limits {
        output_bytes: 1 << 20,
        ..Limits::default()
    };
    assert_eq!(
        run(&sandbox, flood, vec![], limits),
        Err(ComputeError::OutputLimit { limit: 1 << 20 })
    );
}

#[test]
fn host_copies_cost_fuel() {
    let sandbox = Sandbox::new(true).unwrap();
    let read_all = r#"(module (import "p2pvm" "input_read" (func $r (param i32 i64 i32) (result i32)))
      (memory (export "memory") 32)
      (func (export "run") (result i32) (drop (call $r (i32.const 0) (i64.const 0) (i32.const 2000000))) (i32.const 0)))"#;
    let small = run(&sandbox, read_all, vec![1; 8], Limits::default()).unwrap();
    let big = run(&sandbox, read_all, vec![1; 2_000_000], Limits::default()).unwrap();
    assert!(
        big.fuel_used - small.fuel_used >= 2_000_000 / 8 - 1,
        "{} vs {}",
        big.fuel_used,
        small.fuel_used
    );
}

#[test]
fn a_running_job_can_be_cancelled() {
    let sandbox = Sandbox::new(true).unwrap();
    let program = sandbox.compile(LOOP_FOREVER.as_bytes()).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        flag.store(true, Ordering::Relaxed);
    });
    let started = Instant::now();
    let out = sandbox.run(&program, Arc::new(vec![]), &Limits::default(), cancel);
    stopper.join().unwrap();
    assert_eq!(out, Err(ComputeError::Cancelled));
    assert!(started.elapsed() < Duration::from_secs(5));
}
