//! The console protocol between scenario scripts and the harness, and the [`Outcome`] of a
//! run.
//!
//! Lines are cleaned first (lossy UTF-8, no `\r`, no ANSI escape sequences or other control
//! characters). Then, at the start of a line:
//! * `P2PVM-RESULT key=value [key=value ...]` — values without spaces — is a result line;
//! * `P2PVM-EXIT status=N` — printed by the harness's launcher — is the L1 script's exit status;
//! * `P2PVM-L1-READY kvm=yes|no [uptime_s=S]` — printed once the test host is up;
//! * `P2PVM-WARN ...` — a warning from the harness's scripts (e.g. a module failed to load).

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::run::RunnerKind;

/// How many console lines an error message quotes.
pub const TAIL_LINES: usize = 40;

/// Turns raw console bytes (one line, without its `\n`) into clean text.
pub fn clean_line(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                // CSI: parameters and intermediates, then one final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC (and similar strings): until BEL or ESC \.
                Some(']' | 'P' | '_' | '^') => {
                    while let Some(c) = chars.next() {
                        if c == '\x07' || (c == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                // A two-character sequence such as ESC c or ESC 7; charset selection takes one more.
                Some('(' | ')' | '*' | '+') => {
                    chars.next();
                }
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// One `P2PVM-RESULT` line: its `key=value` fields in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResultLine {
    /// The fields, in the order printed.
    pub fields: Vec<(String, String)>,
}

impl ResultLine {
    /// The value of `key` in this line.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a `P2PVM-RESULT` line; words without `=` are ignored.
pub fn parse_result(line: &str) -> Option<ResultLine> {
    let rest = line.strip_prefix("P2PVM-RESULT")?;
    if !(rest.is_empty() || rest.starts_with(' ')) {
        return None;
    }
    let fields = rest
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(ResultLine { fields })
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// What the test host reported when it came up.
#[derive(Debug, Clone, PartialEq)]
pub struct L1Ready {
    /// Whether `/dev/kvm` existed after the modules were loaded.
    pub kvm: bool,
    /// Seconds since L1's kernel booted (nested runner only).
    pub uptime_s: Option<f64>,
}

/// The result of running a scenario.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Which runner ran it.
    pub runner: RunnerKind,
    /// The L1 script's exit status.
    pub exit_status: i32,
    /// The `P2PVM-RESULT` lines, in order.
    pub results: Vec<ResultLine>,
    /// The test host's ready line.
    pub l1_ready: Option<L1Ready>,
    /// `P2PVM-WARN` lines.
    pub warnings: Vec<String>,
    /// The whole console (cleaned lines; stderr lines prefixed `[stderr] `).
    pub console: String,
    /// Wall time from starting QEMU (or the script) to its end.
    pub wall: Duration,
}

impl Outcome {
    /// The last value reported for `key` by any result line.
    pub fn result(&self, key: &str) -> Option<&str> {
        self.results.iter().rev().find_map(|r| r.get(key))
    }

    /// The last value reported for `key`, parsed as a number.
    pub fn result_f64(&self, key: &str) -> Result<f64> {
        let text = self
            .result(key)
            .with_context(|| format!("no result `{key}`; console:\n{}", self.tail()))?;
        text.parse()
            .with_context(|| format!("result {key}={text} is not a number"))
    }

    /// Every value reported for `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.results.iter().filter_map(|r| r.get(key)).collect()
    }

    /// Ok when the L1 script exited 0; else an error quoting the end of the console.
    pub fn ensure_success(&self) -> Result<&Self> {
        if self.exit_status != 0 {
            bail!(
                "the L1 script exited with status {}; console:\n{}",
                self.exit_status,
                self.tail()
            );
        }
        Ok(self)
    }

    /// The last [`TAIL_LINES`] console lines.
    pub fn tail(&self) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }
}

/// Console lines as they arrive, with what has been parsed out of them so far.
#[derive(Debug, Default)]
pub(crate) struct Transcript {
    pub console: String,
    pub tail: VecDeque<String>,
    pub results: Vec<ResultLine>,
    pub exit_status: Option<i32>,
    pub l1_ready: Option<L1Ready>,
    pub warnings: Vec<String>,
}

impl Transcript {
    /// Records one clean line (`stderr` lines are only kept for the record).
    pub fn push(&mut self, line: &str, stderr: bool) {
        let shown = if stderr {
            format!("[stderr] {line}")
        } else {
            line.to_string()
        };
        self.console.push_str(&shown);
        self.console.push('\n');
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(shown);
        if stderr {
            return;
        }
        if let Some(result) = parse_result(line) {
            self.results.push(result);
        } else if line.starts_with("P2PVM-EXIT ") {
            self.exit_status = field(line, "status").and_then(|s| s.parse().ok());
        } else if line.starts_with("P2PVM-L1-READY") {
            let kvm = field(line, "kvm") == Some("yes");
            let uptime_s = field(line, "uptime_s").and_then(|s| s.parse().ok());
            self.l1_ready = Some(L1Ready { kvm, uptime_s });
        } else if line.starts_with("P2PVM-WARN") {
            self.warnings.push(line.to_string());
        }
    }

    /// The last lines, one per line.
    pub fn tail_text(&self) -> String {
        self.tail
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_cr_and_escapes() {
        assert_eq!(clean_line(b"hello\r"), "hello");
        assert_eq!(clean_line(b"\x1b[0;32mOK\x1b[0m done"), "OK done");
        assert_eq!(clean_line(b"\x1bc\x1b[?7l\x1b[2J\x1b[1;1Hboot"), "boot");
        assert_eq!(clean_line(b"\x1b]0;title\x07x\x1b(By"), "xy");
        assert_eq!(clean_line(b"a\tb\x00\x08c\xff"), "a\tbc\u{fffd}");
    }

    #[test]
    fn parses_results_in_order() {
        let r = parse_result("P2PVM-RESULT vmm=qemu init_s=26.1 junk l2_uptime_s=4.8").unwrap();
        assert_eq!(r.get("vmm"), Some("qemu"));
        assert_eq!(r.fields.len(), 3);
        assert_eq!(r.fields[2], ("l2_uptime_s".to_string(), "4.8".to_string()));
        assert!(parse_result("P2PVM-RESULTS x=1").is_none());
        assert!(parse_result("echo P2PVM-RESULT x=1").is_none());
    }

    #[test]
    fn transcript_collects_markers() {
        let mut t = Transcript::default();
        for line in [
            "P2PVM-L1-READY kvm=yes uptime_s=2.61",
            "P2PVM-WARN module x failed to load",
            "P2PVM-RESULT run=1 t=0.5",
            "P2PVM-RESULT run=2 t=0.7",
            "P2PVM-EXIT status=3",
        ] {
            t.push(line, false);
        }
        t.push("P2PVM-EXIT status=9", true);
        assert_eq!(t.exit_status, Some(3));
        assert_eq!(
            t.l1_ready,
            Some(L1Ready {
                kvm: true,
                uptime_s: Some(2.61)
            })
        );
        assert_eq!(t.warnings.len(), 1);
        let outcome = Outcome {
            runner: RunnerKind::Nested,
            exit_status: 3,
            results: t.results.clone(),
            l1_ready: t.l1_ready.clone(),
            warnings: t.warnings.clone(),
            console: t.console.clone(),
            wall: Duration::ZERO,
        };
        assert_eq!(outcome.result("t"), Some("0.7"));
        assert_eq!(outcome.all("run"), ["1", "2"]);
        assert_eq!(outcome.result_f64("t").unwrap(), 0.7);
        assert!(outcome.result_f64("missing").is_err());
        assert!(
            outcome
                .ensure_success()
                .unwrap_err()
                .to_string()
                .contains("[stderr] P2PVM-EXIT")
        );
    }

    #[test]
    fn tail_is_bounded() {
        let mut t = Transcript::default();
        for i in 0..100 {
            t.push(&format!("line {i}"), false);
        }
        assert_eq!(t.tail.len(), TAIL_LINES);
        assert!(t.tail_text().starts_with("line 60\n"));
    }
}
