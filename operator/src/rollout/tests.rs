//! The planner's rules, phase by phase (table-driven), and a property test over random
//! observed states.

use std::time::Duration;

use pgpilot_common::crd::{RolloutMode, RolloutStatus};
use rand::{Rng, SeedableRng};

use super::*;

const NEW: &str = "rev2";
const OLD: &str = "rev1";

fn pod(shard: &str, i: usize, rev: &str, primary: bool) -> PodView {
    PodView {
        name: format!("c-{shard}-{i}"),
        ip: Some(format!("127.0.0.{}", i + 1)),
        revision: Some(rev.into()),
        ready: true,
        primary,
        deleting: false,
        age: Duration::from_secs(100),
        unready_for: Duration::ZERO,
        lag_bytes: (!primary).then_some(0),
        archive_backlog: primary.then_some(0),
        streaming: !primary,
        drain: None,
    }
}

/// `n` shards of 2 instances (primary = index 0), every pod at `rev`.
fn shards(n: usize, rev: &str) -> Vec<ShardView> {
    (0..n)
        .map(|i| {
            let name = format!("shard-{i}");
            ShardView {
                pods: vec![pod(&name, 0, rev, true), pod(&name, 1, rev, false)],
                name,
                instances: 2,
            }
        })
        .collect()
}

fn settings(mode: RolloutMode, release: Option<&str>) -> Settings {
    Settings {
        mode,
        canaries: 1,
        release: release.map(str::to_string),
        soak: Duration::from_secs(30),
        max_lag_bytes: 1 << 20,
        ready_timeout: Duration::from_secs(600),
        max_archive_backlog: 16,
    }
}

fn at(secs: i64) -> jiff::Timestamp {
    jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap()
}

fn run(
    sh: &[ShardView],
    s: &Settings,
    last: Option<&RolloutStatus>,
    now: i64,
) -> (Step, RolloutStatus) {
    plan(&Observed {
        target: NEW,
        generation: Some(1),
        settings: s,
        shards: sh,
        last,
        now: at(now),
    })
}

#[test]
fn pods_made_at_the_revision_are_idle() {
    let (step, st) = run(
        &shards(3, NEW),
        &settings(RolloutMode::Manual, None),
        None,
        0,
    );
    assert_eq!(step, Step::Nothing);
    assert_eq!(st.phase, IDLE);
}

#[test]
fn manual_mode_waits_for_the_release_then_again_after_the_canaries() {
    let sh = shards(3, OLD);
    let s = settings(RolloutMode::Manual, None);
    let (step, st) = run(&sh, &s, None, 0);
    assert_eq!(step, Step::WaitForRelease);
    assert_eq!(st.phase, WAITING);
    assert_eq!(st.target_revision.as_deref(), Some(NEW));
    // Released: the canary's replica is drained first.
    let s = settings(RolloutMode::Manual, Some(NEW));
    let (step, st) = run(&sh, &s, Some(&st), 1);
    assert_eq!(
        step,
        Step::DrainPod {
            shard: "shard-0".into(),
            pod: "c-shard-0-1".into()
        }
    );
    assert_eq!(st.phase, IN_PROGRESS);
    assert!(st.canaries_released);
    // The canary done: waiting for `<rev>/all`, other shards untouched.
    let mut done = st.clone();
    done.completed_shards = vec!["shard-0".into()];
    done.current_shard = None;
    let (step, st) = run(&sh, &s, Some(&done), 2);
    assert_eq!(step, Step::WaitForRelease);
    assert!(st.step.unwrap().contains("rev2/all"));
    let s = settings(RolloutMode::Manual, Some("rev2/all"));
    let (step, _) = run(&sh, &s, Some(&done), 3);
    assert_eq!(step.touches(), Some("shard-1"));
}

#[test]
fn inside_a_shard_replicas_then_switchover_then_the_old_primary_then_soak() {
    let s = settings(RolloutMode::Automatic, None);
    let mut sh = shards(2, OLD);
    let (step, st) = run(&sh, &s, None, 0);
    assert!(matches!(step, Step::DrainPod { ref pod, .. } if pod == "c-shard-0-1"));
    // Drain finished → delete.
    sh[0].pods[1].drain = Some(("Finished".into(), String::new()));
    let (step, st) = run(&sh, &s, Some(&st), 1);
    assert!(matches!(step, Step::DeletePod { ref pod, .. } if pod == "c-shard-0-1"));
    // Recreated at the new revision, not ready yet → wait.
    sh[0].pods[1] = PodView {
        ready: false,
        age: Duration::from_secs(5),
        ..pod("shard-0", 1, NEW, false)
    };
    let (step, st) = run(&sh, &s, Some(&st), 2);
    assert!(matches!(step, Step::Wait(_)), "{step:?}");
    // Ready but lagging → wait; caught up → switchover to it.
    sh[0].pods[1].ready = true;
    sh[0].pods[1].lag_bytes = Some(10 << 20);
    let (step, st) = run(&sh, &s, Some(&st), 3);
    assert!(
        matches!(step, Step::Wait(ref w) if w.contains("catch up")),
        "{step:?}"
    );
    sh[0].pods[1].lag_bytes = Some(0);
    sh[0].pods[1].streaming = false;
    let (step, st) = run(&sh, &s, Some(&st), 4);
    assert!(
        matches!(step, Step::Wait(ref w) if w.contains("to stream")),
        "not before it streams: {step:?}"
    );
    sh[0].pods[1].streaming = true;
    let (step, st) = run(&sh, &s, Some(&st), 4);
    assert_eq!(
        step,
        Step::Switchover {
            shard: "shard-0".into(),
            from: "c-shard-0-0".into(),
            to: "c-shard-0-1".into()
        }
    );
    // Recorded before it runs: the new primary is expected, and until the role labels follow
    // (they lag by a moment), the old one is waited for, not taken for a failover.
    assert_eq!(st.shard_primary.as_deref(), Some("c-shard-0-1"));
    assert_eq!(st.switchover_from.as_deref(), Some("c-shard-0-0"));
    let (step, st) = run(&sh, &s, Some(&st), 5);
    assert!(
        matches!(step, Step::Wait(ref w) if w.contains("role labels")),
        "{step:?}"
    );
    let (late, _) = run(&sh, &s, Some(&st), 70);
    assert!(
        matches!(late, Step::Halt(ref r) if r.contains("did not happen")),
        "{late:?}"
    );
    sh[0].pods[0].primary = false;
    sh[0].pods[0].lag_bytes = Some(0);
    sh[0].pods[1].primary = true;
    let (step, st) = run(&sh, &s, Some(&st), 6);
    assert!(matches!(step, Step::DrainPod { ref pod, .. } if pod == "c-shard-0-0"));
    assert_eq!(st.switchover_from, None, "the labels followed");
    sh[0].pods[0] = pod("shard-0", 0, NEW, false);
    let (step, st) = run(&sh, &s, Some(&st), 6);
    assert!(matches!(step, Step::Soak { .. }), "{step:?}");
    let (step, st) = run(&sh, &s, Some(&st), 20);
    assert!(matches!(step, Step::Soak { left, .. } if left == Duration::from_secs(16)));
    let (step, st) = run(&sh, &s, Some(&st), 40);
    assert_eq!(step, Step::Nothing, "next shard on the next reconcile");
    assert_eq!(st.completed_shards, ["shard-0"]);
    let (step, _) = run(&sh, &s, Some(&st), 41);
    assert_eq!(step.touches(), Some("shard-1"));
}

#[test]
fn the_last_shard_done_is_complete() {
    let s = settings(RolloutMode::Automatic, None);
    let sh = shards(2, NEW);
    let last = RolloutStatus {
        phase: IN_PROGRESS.into(),
        target_revision: Some(NEW.into()),
        completed_shards: vec!["shard-0".into()],
        current_shard: Some("shard-1".into()),
        soak_started: Some(at(0).to_string()),
        ..Default::default()
    };
    let (step, st) = run(&sh, &s, Some(&last), 100);
    assert_eq!(step, Step::Complete);
    assert_eq!(st.phase, COMPLETE);
    assert_eq!(st.completed_shards, ["shard-0", "shard-1"]);
    // And it stays complete.
    let (step, st) = run(&sh, &s, Some(&st), 101);
    assert_eq!((step, st.phase.as_str()), (Step::Complete, COMPLETE));
}

#[test]
fn halts_on_a_failed_drain_a_pod_never_ready_and_a_failover_and_stays_until_the_spec_changes() {
    let s = settings(RolloutMode::Automatic, None);
    let mut sh = shards(2, OLD);
    let (_, st) = run(&sh, &s, None, 0);
    sh[0].pods[1].drain = Some(("Failed".into(), "no archive".into()));
    let (step, halted) = run(&sh, &s, Some(&st), 1);
    assert!(
        matches!(step, Step::Halt(ref r) if r.contains("no archive")),
        "{step:?}"
    );
    assert_eq!(halted.phase, HALTED);
    assert_eq!(halted.halted_generation, Some(1));
    // Halted: nothing, even once the drain is fixed, until the generation changes.
    sh[0].pods[1].drain = None;
    let (step, st) = run(&sh, &s, Some(&halted), 2);
    assert_eq!((step, st.phase.as_str()), (Step::Nothing, HALTED));
    let (step, st) = plan(&Observed {
        target: NEW,
        generation: Some(2),
        settings: &s,
        shards: &sh,
        last: Some(&halted),
        now: at(3),
    });
    assert_eq!(st.phase, IN_PROGRESS);
    assert_eq!(step.touches(), Some("shard-0"));

    // An updated pod never ready past the timeout.
    let mut sh = shards(2, OLD);
    sh[0].pods[1] = PodView {
        ready: false,
        age: Duration::from_secs(601),
        ..pod("shard-0", 1, NEW, false)
    };
    let (step, _) = run(&sh, &s, Some(&st), 4);
    assert!(
        matches!(step, Step::Halt(ref r) if r.contains("not Ready")),
        "{step:?}"
    );

    // The primary changed without the rollout.
    let sh = shards(2, OLD);
    let mut last = st.clone();
    last.shard_primary = Some("c-shard-0-1".into());
    let (step, _) = run(&sh, &s, Some(&last), 5);
    assert!(
        matches!(step, Step::Halt(ref r) if r.contains("failover")),
        "{step:?}"
    );
}

#[test]
fn a_new_revision_replaces_a_halted_rollout() {
    let s = settings(RolloutMode::Automatic, None);
    let halted = RolloutStatus {
        phase: HALTED.into(),
        target_revision: Some("bad".into()),
        halted_generation: Some(1),
        current_shard: Some("shard-0".into()),
        ..Default::default()
    };
    let (step, st) = run(&shards(2, OLD), &s, Some(&halted), 0);
    assert_eq!(st.phase, IN_PROGRESS);
    assert_eq!(st.target_revision.as_deref(), Some(NEW));
    assert_eq!(step.touches(), Some("shard-0"));
}

#[test]
fn after_a_halt_a_fixed_revision_repairs_the_broken_canary_and_skips_shards_already_there() {
    // The bad revision left shard-0's replica crashing; the spec went back to the revision
    // every other pod runs.
    let s = settings(RolloutMode::Automatic, None);
    let mut sh = shards(3, NEW);
    sh[0].pods[1] = PodView {
        ready: false,
        lag_bytes: None,
        unready_for: Duration::from_secs(31),
        ..pod("shard-0", 1, "bad", false)
    };
    let halted = RolloutStatus {
        phase: HALTED.into(),
        target_revision: Some("bad".into()),
        current_shard: Some("shard-0".into()),
        halted_generation: Some(1),
        ..Default::default()
    };
    let (step, st) = run(&sh, &s, Some(&halted), 0);
    assert!(
        matches!(step, Step::DeletePod { ref pod, .. } if pod == "c-shard-0-1"),
        "{step:?}"
    );
    // Unready for a moment only (a former primary rejoining): waited for, not deleted.
    sh[0].pods[1].unready_for = Duration::from_secs(3);
    let (step, _) = run(&sh, &s, Some(&halted), 0);
    assert!(matches!(step, Step::Wait(_)), "{step:?}");
    assert_eq!(
        st.completed_shards,
        ["shard-1", "shard-2"],
        "nothing to do there"
    );
}

#[test]
fn a_single_instance_shard_deletes_its_primary() {
    let s = settings(RolloutMode::Automatic, None);
    let mut sh = shards(1, OLD);
    sh[0].pods.truncate(1);
    sh[0].instances = 1;
    let (step, _) = run(&sh, &s, None, 0);
    assert!(matches!(step, Step::DeletePod { ref pod, .. } if pod == "c-shard-0-0"));
}

/// Random observed states (pods' revisions, readiness, roles, lag, drains, deletions; the last
/// status at any point of a rollout) against the rules: never start on a shard while another
/// one is unhealthy; never drain or delete a primary of a shard with replicas; never act on a
/// shard other than the canaries before they are complete and, in Manual mode, released.
#[test]
fn property_the_planner_never_breaks_the_safety_rules() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut checked = 0;
    for _ in 0..20_000 {
        let n = rng.random_range(1..=4usize);
        let instances = rng.random_range(1..=3usize);
        let mut sh: Vec<ShardView> = (0..n)
            .map(|i| {
                let name = format!("shard-{i}");
                let count = if rng.random_bool(0.1) {
                    instances - 1
                } else {
                    instances
                };
                let primary_at = rng.random_range(0..instances.max(1));
                let pods = (0..count)
                    .map(|j| {
                        let primary = j == primary_at && !rng.random_bool(0.05);
                        let rev = if rng.random_bool(0.5) { NEW } else { OLD };
                        let mut p = pod(&name, j, rev, primary);
                        p.ready = !rng.random_bool(0.15);
                        p.deleting = rng.random_bool(0.05);
                        if !primary {
                            p.lag_bytes =
                                rng.random_bool(0.9).then(|| rng.random_range(0..4 << 20));
                        }
                        if rng.random_bool(0.1) {
                            let v = ["Started", "Acknowledged", "Finished", "Failed"]
                                [rng.random_range(0..4)];
                            p.drain = Some((v.into(), String::new()));
                        }
                        p.age = Duration::from_secs(rng.random_range(0..1200));
                        if !p.ready {
                            p.unready_for = Duration::from_secs(rng.random_range(0..60));
                        }
                        p
                    })
                    .collect();
                ShardView {
                    name,
                    pods,
                    instances,
                }
            })
            .collect();
        if rng.random_bool(0.05) {
            sh = shards(n, NEW);
        }
        let mode = if rng.random_bool(0.5) {
            RolloutMode::Manual
        } else {
            RolloutMode::Automatic
        };
        let release = [None, Some(NEW), Some("rev2/all"), Some("other")][rng.random_range(0..4)];
        let mut s = settings(mode, release);
        s.canaries = rng.random_range(0..=n);
        let names: Vec<String> = sh.iter().map(|s| s.name.clone()).collect();
        let done = rng.random_range(0..=n);
        let current = (done < n && rng.random_bool(0.5)).then(|| names[done].clone());
        let last = RolloutStatus {
            phase: [PENDING, WAITING, IN_PROGRESS, HALTED, COMPLETE][rng.random_range(0..5)].into(),
            target_revision: Some(if rng.random_bool(0.9) { NEW } else { OLD }.into()),
            completed_shards: names[..done].to_vec(),
            current_shard: current.clone(),
            shard_primary: None,
            halted_generation: Some(rng.random_range(0..3)),
            ..Default::default()
        };
        let last = rng.random_bool(0.9).then_some(last);
        let (step, st) = plan(&Observed {
            target: NEW,
            generation: Some(1),
            settings: &s,
            shards: &sh,
            last: last.as_ref(),
            now: at(0),
        });
        let Some(touched) = step.touches() else {
            continue;
        };
        checked += 1;
        let shard = sh.iter().find(|x| x.name == touched).unwrap();
        // Only the shard in progress, or a new one when every shard is healthy.
        let resumed = last
            .as_ref()
            .and_then(|l| l.current_shard.as_deref())
            .filter(|_| last.as_ref().unwrap().target_revision.as_deref() == Some(NEW));
        if resumed != Some(touched) {
            for other in sh.iter().filter(|o| o.name != touched) {
                assert!(
                    other.unhealthy(&s).is_none(),
                    "started {touched} while {} is unhealthy: {step:?}",
                    other.name
                );
            }
        }
        // Never a primary of a shard with replicas, except after a switchover made it one.
        if let Step::DrainPod { pod, .. } | Step::DeletePod { pod, .. } = &step {
            let p = shard.pods.iter().find(|p| &p.name == pod).unwrap();
            let finished = p.drain.as_ref().is_some_and(|(v, _)| v == "Finished");
            assert!(
                !p.primary || shard.instances == 1 || finished,
                "{step:?} on a primary: {shard:?}"
            );
        }
        // Canaries first, and released.
        let canaries = &names[..s.canaries.min(n)];
        if !canaries.contains(&touched.to_string()) {
            assert!(
                canaries.iter().all(|c| st.completed_shards.contains(c)),
                "{touched} before the canaries are done: {st:?}"
            );
            // (A shard already in progress is finished whatever the gate says now.)
            if mode == RolloutMode::Manual && resumed != Some(touched) {
                assert_eq!(s.release.as_deref(), Some("rev2/all"), "{step:?}");
            }
        } else if mode == RolloutMode::Manual && resumed != Some(touched) {
            assert!(
                matches!(s.release.as_deref(), Some(NEW) | Some("rev2/all")),
                "a canary not released: {step:?}"
            );
        }
    }
    assert!(checked > 1000, "only {checked} states led to an action");
}
