//! The host API: everything a job may import, all under the module name
//! `p2pvm`. A job reads its input and writes its output through it and can
//! reach nothing else (no clock, no randomness, no files, no network), so the
//! same module on the same input gives the same output and the same fuel on
//! every provider: that is what lets results be compared by content id.
//!
//! | import | type | does |
//! |---|---|---|
//! | `input_len` | `() -> i64` | the input's length in bytes |
//! | `input_read` | `(dst: i32, offset: i64, len: i32) -> i32` | copies up to `len` input bytes from `offset` to memory at `dst`; returns how many |
//! | `output_write` | `(src: i32, len: i32) -> i32` | appends `len` bytes of memory at `src` to the output; returns 0 |
//!
//! A job exports `memory` and `run: () -> i32` (0 = success). Copies cost
//! fuel (one unit per [`COPY_BYTES_PER_FUEL`] bytes) so that work done by the
//! host on a job's behalf is metered too. Out-of-range pointers trap.

use std::sync::Arc;

use wasmtime::{Caller, Extern, Linker, ResourceLimiter};

/// The import module name.
pub const MODULE: &str = "p2pvm";
/// The functions a job may import.
pub const FUNCTIONS: [&str; 3] = ["input_len", "input_read", "output_write"];
/// Bytes copied by the host per unit of fuel.
pub const COPY_BYTES_PER_FUEL: u64 = 8;

/// What a running job's host functions see.
pub(crate) struct HostState {
    pub input: Arc<Vec<u8>>,
    pub output: Vec<u8>,
    pub max_output: usize,
    pub metered: bool,
    pub limiter: MemoryLimiter,
}

/// Why the host stopped a job (carried through wasmtime's error and told
/// apart from traps afterwards).
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Halt {
    #[error("memory limit")]
    Memory { asked: u64, limit: u64 },
    #[error("output limit")]
    Output { limit: u64 },
    #[error("wall-clock limit")]
    WallTime,
    #[error("cancelled")]
    Cancelled,
    #[error("bad pointer: {0}")]
    BadPointer(&'static str),
}

/// Table elements a job may have (tables hold function references only).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Refuses memory growth past the job's limit, and says so (a plain refusal
/// would make `memory.grow` return -1, which a job may ignore and then fail
/// in some less telling way).
pub(crate) struct MemoryLimiter {
    limit: u64,
}

impl MemoryLimiter {
    /// Memory growth allowed up to `limit` bytes.
    pub(crate) fn new(limit: u64) -> Self {
        Self { limit }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.limit {
            return Err(Halt::Memory {
                asked: desired as u64,
                limit: self.limit,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Adds the host API to `linker`.
pub(crate) fn add_to(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(MODULE, "input_len", |caller: Caller<'_, HostState>| {
        caller.data().input.len() as i64
    })?;
    linker.func_wrap(
        MODULE,
        "input_read",
        |mut caller: Caller<'_, HostState>,
         dst: i32,
         offset: i64,
         len: i32|
         -> wasmtime::Result<i32> {
            let input = caller.data().input.clone();
            let (Ok(dst), Ok(offset), Ok(len)) = (
                usize::try_from(dst),
                usize::try_from(offset),
                usize::try_from(len),
            ) else {
                return Err(Halt::BadPointer("negative pointer, offset or length").into());
            };
            let from = offset.min(input.len());
            let n = len.min(input.len() - from);
            charge(&mut caller, n)?;
            let memory = memory(&mut caller)?;
            let window = memory
                .data_mut(&mut caller)
                .get_mut(dst..dst.saturating_add(n))
                .ok_or(Halt::BadPointer("input_read destination outside memory"))?;
            window.copy_from_slice(&input[from..from + n]);
            Ok(n as i32)
        },
    )?;
    linker.func_wrap(
        MODULE,
        "output_write",
        |mut caller: Caller<'_, HostState>, src: i32, len: i32| -> wasmtime::Result<i32> {
            let (Ok(src), Ok(len)) = (usize::try_from(src), usize::try_from(len)) else {
                return Err(Halt::BadPointer("negative pointer or length").into());
            };
            charge(&mut caller, len)?;
            let state = caller.data();
            if state.output.len().saturating_add(len) > state.max_output {
                return Err(Halt::Output {
                    limit: state.max_output as u64,
                }
                .into());
            }
            let memory = memory(&mut caller)?;
            let (data, state) = memory.data_and_store_mut(&mut caller);
            let bytes = data
                .get(src..src.saturating_add(len))
                .ok_or(Halt::BadPointer("output_write source outside memory"))?;
            state.output.extend_from_slice(bytes);
            Ok(0)
        },
    )?;
    Ok(())
}

fn memory(caller: &mut Caller<'_, HostState>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => Err(Halt::BadPointer("the module exports no memory").into()),
    }
}

/// Takes fuel for `bytes` copied; running out here is running out of fuel.
fn charge(caller: &mut Caller<'_, HostState>, bytes: usize) -> wasmtime::Result<()> {
    if !caller.data().metered {
        return Ok(());
    }
    let cost = (bytes as u64).div_ceil(COPY_BYTES_PER_FUEL);
    let left = caller.get_fuel()?;
    if cost > left {
        caller.set_fuel(0)?;
        return Err(wasmtime::Trap::OutOfFuel.into());
    }
    caller.set_fuel(left - cost)
}
