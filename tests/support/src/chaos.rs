//! The reliability trials' harness (`make chaos`, docs/chaos.md). One trial = a setup, many
//! runs that each inject a fault chosen by a seeded RNG, and a checker after each run. A trial
//! also plants a fault its checker must catch (a checker that cannot fail is a defect), counts
//! which faults it hit, and appends one JSON line to the report that `scripts/chaos.sh` prints
//! as the table. Any failure fails the test, after the report line is written.
//!
//! - `PGPILOT_CHAOS_QUICK=1`: the short mode CI runs (`make chaos-quick`);
//! - `PGPILOT_CHAOS_RUNS=N`: exactly N runs of every trial;
//! - `PGPILOT_CHAOS_SEED=S`: replay a trial with the seed its report printed;
//! - `PGPILOT_CHAOS_REPORT=F`: where the report lines go (default `target/chaos/report.jsonl`).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::StdRng;

/// One trial: its seeded RNG, its run count, and what it found.
pub struct Trial {
    id: String,
    checked: String,
    seed: u64,
    rng: StdRng,
    runs: usize,
    done: usize,
    failures: Vec<String>,
    self_tests: Vec<(String, bool)>,
    coverage: BTreeMap<String, usize>,
    started: Instant,
}

/// Whether the short mode (`make chaos-quick`) is on.
pub fn quick() -> bool {
    std::env::var("PGPILOT_CHAOS_QUICK").is_ok_and(|v| v == "1" || v == "true")
}

impl Trial {
    /// Trial `id` (e.g. `R1`), checking `checked` (the table's last column), with `full` runs in
    /// `make chaos` and `quick` in the short mode.
    pub fn new(id: &str, checked: &str, full: usize, quick_runs: usize) -> Trial {
        let seed = std::env::var("PGPILOT_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        let runs = std::env::var("PGPILOT_CHAOS_RUNS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if quick() { quick_runs } else { full });
        eprintln!("{id}: {runs} runs, seed {seed} (replay: PGPILOT_CHAOS_SEED={seed})");
        Trial {
            id: id.into(),
            checked: checked.into(),
            seed,
            rng: StdRng::seed_from_u64(seed),
            runs,
            done: 0,
            failures: Vec::new(),
            self_tests: Vec::new(),
            coverage: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    pub fn runs(&self) -> usize {
        self.runs
    }

    /// For a trial whose runs are an enumeration (every damage case), its number of cases.
    pub fn set_runs(&mut self, runs: usize) {
        self.runs = runs;
    }

    /// The trial's RNG: every random choice comes from here, so the seed replays the trial.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Counts one occurrence of `what` (which fault, at which moment) for the report.
    pub fn count(&mut self, what: impl Into<String>) {
        *self.coverage.entry(what.into()).or_default() += 1;
    }

    /// Records that `checker`, given a deliberately broken input, `caught` it.
    pub fn self_test(&mut self, checker: &str, caught: bool) {
        eprintln!(
            "{}: checker self-test {checker}: {}",
            self.id,
            if caught { "caught" } else { "MISSED" }
        );
        self.self_tests.push((checker.into(), caught));
    }

    /// Records run `run`'s checker result.
    pub fn check(&mut self, run: usize, result: Result<(), String>) {
        self.done += 1;
        match result {
            Ok(()) => eprintln!("{} run {run}/{}: ok", self.id, self.runs),
            Err(e) => {
                eprintln!("{} run {run}/{}: FAILED: {e}", self.id, self.runs);
                self.failures.push(format!("run {run}: {e}"));
            }
        }
    }

    /// Ends a trial that cannot run on this machine: the report says why, and the test passes.
    pub fn skip(self, why: &str) {
        let line = serde_json::json!({
            "trial": self.id,
            "runs": 0,
            "failures": 0,
            "checked": self.checked,
            "skipped": why,
            "seed": self.seed.to_string(),
        });
        append_report(&line);
        eprintln!("{}: SKIPPED: {why}", self.id);
    }

    /// Writes the report line, then fails the test on any failure or missed self-test.
    pub fn finish(self) {
        let missed: Vec<&str> = self
            .self_tests
            .iter()
            .filter(|(_, caught)| !caught)
            .map(|(c, _)| c.as_str())
            .collect();
        let line = serde_json::json!({
            "trial": self.id,
            "runs": self.done,
            "failures": self.failures.len(),
            "checked": self.checked,
            "seed": self.seed.to_string(),
            "seconds": self.started.elapsed().as_secs(),
            "coverage": self.coverage,
            "self_tests": self.self_tests.iter().map(|(c, ok)| serde_json::json!({"checker": c, "caught": ok})).collect::<Vec<_>>(),
            "first_failures": self.failures.iter().take(3).collect::<Vec<_>>(),
        });
        append_report(&line);
        eprintln!("CHAOS {line}");
        assert!(
            self.failures.is_empty() && missed.is_empty(),
            "{}: {} of {} runs failed (seed {}; replay with PGPILOT_CHAOS_SEED={}), checkers that missed their planted fault: {missed:?}\n{}",
            self.id,
            self.failures.len(),
            self.done,
            self.seed,
            self.seed,
            self.failures.join("\n")
        );
    }
}

/// Appends one JSON line to the report.
fn append_report(line: &serde_json::Value) {
    let path = report_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(mut f) => {
            let _ = writeln!(f, "{line}");
        }
        Err(e) => eprintln!("cannot append to {}: {e}", path.display()),
    }
}

/// `PGPILOT_CHAOS_REPORT`, or `target/chaos/report.jsonl` in the workspace.
pub fn report_path() -> PathBuf {
    std::env::var_os("PGPILOT_CHAOS_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::tools::workspace_root().join("target/chaos/report.jsonl"))
}
