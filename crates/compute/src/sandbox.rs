//! The sandbox: compiles a job once, refusing what may not run, and runs it
//! under fuel, memory, output and wall-clock limits.
//!
//! Fuel is wasmtime's deterministic instruction metering: the work a job did
//! is exact and the same on every provider. Wall time uses epoch
//! interruption (a ticker thread bumps the engine's epoch every
//! [`TICK`] while a job runs; the job's deadline callback compares the
//! elapsed time and the cancel flag), which costs far less than fuel and also
//! stops a job stuck in a host-free loop when metering is off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::{
    Config, Engine, ExternType, InstancePre, Linker, Module, OptLevel, Store, Trap, UpdateDeadline,
    ValType,
};

use crate::ComputeError;
use crate::hostapi::{self, Halt, HostState, MemoryLimiter};

/// How often a running job's deadline is checked.
pub const TICK: Duration = Duration::from_millis(10);

/// What a run may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Linear memory, bytes.
    pub memory_bytes: u64,
    /// Fuel (ignored by an unmetered sandbox).
    pub fuel: u64,
    /// Wall-clock time.
    pub wall: Duration,
    /// Output bytes.
    pub output_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_bytes: 256 << 20,
            fuel: 100_000_000_000,
            wall: Duration::from_secs(60),
            output_bytes: 64 << 20,
        }
    }
}

/// What a finished run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The bytes the job wrote.
    pub output: Vec<u8>,
    /// Fuel used: the work units a receipt names (0 when unmetered).
    pub fuel_used: u64,
    /// How long it ran.
    pub wall: Duration,
}

/// A module that passed every check before running, ready to instantiate.
#[derive(Clone)]
pub struct Program {
    pre: InstancePre<HostState>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").finish_non_exhaustive()
    }
}

/// Compiles and runs jobs. One per node; cheap to share.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    metered: bool,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("metered", &self.metered)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// A sandbox; `metered` turns fuel on (leased jobs always run metered:
    /// unmetered runs exist to measure what metering costs).
    pub fn new(metered: bool) -> Result<Self, ComputeError> {
        let mut config = Config::new();
        config
            .consume_fuel(metered)
            .epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed);
        // Threads (shared memories) are not even built in: the crate leaves
        // wasmtime's `threads` feature off.
        let engine = Engine::new(&config).map_err(|e| ComputeError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        hostapi::add_to(&mut linker).map_err(|e| ComputeError::Engine(e.to_string()))?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            metered,
        })
    }

    /// Whether runs are metered.
    pub fn metered(&self) -> bool {
        self.metered
    }

    /// Validates and compiles `bytes` (binary WebAssembly, or the text format),
    /// refusing a module that imports anything beyond the host API or lacks
    /// the `memory` and `run` exports. Nothing of the module runs here.
    pub fn compile(&self, bytes: &[u8]) -> Result<Program, ComputeError> {
        if bytes.len() as u64 > crate::MAX_MODULE_BYTES {
            return Err(ComputeError::InvalidModule(format!(
                "{} bytes, more than {}",
                bytes.len(),
                crate::MAX_MODULE_BYTES
            )));
        }
        let module = Module::new(&self.engine, bytes)
            .map_err(|e| ComputeError::InvalidModule(format!("{e:#}")))?;
        for import in module.imports() {
            if import.module() != hostapi::MODULE || !hostapi::FUNCTIONS.contains(&import.name()) {
                return Err(ComputeError::ForbiddenImport {
                    module: import.module().into(),
                    name: import.name().into(),
                });
            }
        }
        match module.get_export("memory") {
            Some(ExternType::Memory(_)) => {}
            _ => return Err(ComputeError::InvalidModule("no exported `memory`".into())),
        }
        match module.get_export("run") {
            Some(ExternType::Func(f))
                if f.params().len() == 0
                    && f.results().len() == 1
                    && matches!(f.results().next(), Some(ValType::I32)) => {}
            _ => {
                return Err(ComputeError::InvalidModule(
                    "no exported `run: () -> i32`".into(),
                ));
            }
        }
        // Checks each import's type against the host API's.
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| ComputeError::InvalidModule(format!("{e:#}")))?;
        Ok(Program { pre })
    }

    /// Runs `program` on `input` until it returns, traps or hits a limit.
    /// Blocks the calling thread: call it from a blocking task.
    pub fn run(
        &self,
        program: &Program,
        input: Arc<Vec<u8>>,
        limits: &Limits,
        cancel: Arc<AtomicBool>,
    ) -> Result<Outcome, ComputeError> {
        let engine_error = |e: wasmtime::Error| ComputeError::Engine(format!("{e:#}"));
        let state = HostState {
            input,
            output: Vec::new(),
            max_output: usize::try_from(limits.output_bytes).unwrap_or(usize::MAX),
            metered: self.metered,
            limiter: MemoryLimiter::new(limits.memory_bytes),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        if self.metered {
            store.set_fuel(limits.fuel).map_err(engine_error)?;
        }
        let started = Instant::now();
        let wall = limits.wall;
        let flag = cancel.clone();
        store.epoch_deadline_callback(move |_| {
            if flag.load(Ordering::Relaxed) {
                return Err(Halt::Cancelled.into());
            }
            if started.elapsed() > wall {
                return Err(Halt::WallTime.into());
            }
            Ok(UpdateDeadline::Continue(1))
        });
        store.set_epoch_deadline(1);

        let done = AtomicBool::new(false);
        let result = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    self.engine.increment_epoch();
                }
            });
            let result = program
                .pre
                .instantiate(&mut store)
                .and_then(|instance| instance.get_typed_func::<(), i32>(&mut store, "run"))
                .and_then(|run| run.call(&mut store, ()));
            done.store(true, Ordering::Relaxed);
            result
        });
        let fuel_used = if self.metered {
            limits.fuel - store.get_fuel().map_err(engine_error)?
        } else {
            0
        };
        match result {
            Ok(0) => Ok(Outcome {
                output: std::mem::take(&mut store.data_mut().output),
                fuel_used,
                wall: started.elapsed(),
            }),
            Ok(code) => Err(ComputeError::Trapped(format!("run returned {code}"))),
            Err(e) => Err(classify(e, limits)),
        }
    }
}

/// Turns wasmtime's error into why the job stopped.
fn classify(e: wasmtime::Error, limits: &Limits) -> ComputeError {
    if let Some(halt) = e.downcast_ref::<Halt>() {
        return match halt {
            Halt::Memory { asked, limit } => ComputeError::MemoryLimit {
                asked: *asked,
                limit: *limit,
            },
            Halt::Output { limit } => ComputeError::OutputLimit { limit: *limit },
            Halt::WallTime => ComputeError::WallTime {
                limit_ms: limits.wall.as_millis() as u64,
            },
            Halt::Cancelled => ComputeError::Cancelled,
            Halt::BadPointer(what) => ComputeError::Trapped((*what).into()),
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => ComputeError::OutOfFuel { limit: limits.fuel },
        Some(trap) => ComputeError::Trapped(trap.to_string()),
        None => ComputeError::Trapped(format!("{e:#}")),
    }
}
