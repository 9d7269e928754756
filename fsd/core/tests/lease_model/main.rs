//! A seeded randomized model of `failsafe_core::lease` (issue 12).
//!
//! One simulated world per seed, in milliseconds of a clock every party
//! shares (same rate; the holder counts from send times, the leader from
//! receive times, as the API asks): an authoritative store, a leader that
//! can be deposed (its successor has a fresh `Leases` table), and a few
//! mounts, each with a `HolderView` and one ordered stream to the leader it
//! believes in. Messages are delayed at random (stream messages in order),
//! unary reads and write answers may be lost, streams break, mounts freeze
//! for longer than a lease while their clock runs on. Inside the leader,
//! a grant and the store read it precedes, and a change's apply and its
//! `begin_change`, are separate steps other requests can run between.
//!
//! Once a change is done the leader usually reads it back (`refresh.rs`):
//! it takes `change_mark`, grants the holders the change told and the
//! writer its objects, reads the store (now and then slowly), and in one
//! step checks `begun_since` and pushes what it read on those holders'
//! streams (in order with invalidations, which `begin_change` sends in one
//! step too); the writer gets it in its answer, a unary call that may pass
//! stream messages or be lost, and caches it with `amend` under the ticket
//! it took before sending the write.
//!
//! After every step it checks close-to-open: once the writer of a change
//! heard that it is done, no mount's `get` returns an older version, and no
//! mount returns a version that never existed. It also checks that a change
//! at a leader still in office is reported done by
//! `max(begin_change, fence) + lease_ms + drift_ms` at the latest.
//!
//! Not modelled: clocks running at different rates (`drift_ms` is only
//! exercised as slack), duplicated messages, a deposed leader that still
//! answers (the model assumes Raft stops it), and a leader noticing a
//! broken stream late (`disconnect` runs when the stream breaks).
//!
//! `LEASE_MODEL_SEED=<n>` replays one seed with a full trace;
//! `LEASE_MODEL_SEEDS=<n>` changes how many seeds a run explores.

mod handle;
mod refresh;
mod world;

use world::*;

fn explore(succession: Succession, test: &str) {
    if let Ok(s) = std::env::var("LEASE_MODEL_SEED") {
        let seed: u64 = s.parse().expect("LEASE_MODEL_SEED is a number");
        let mut sim = Sim::new(seed, succession, true);
        let result = sim.run();
        for line in sim.trace.take().unwrap_or_default() {
            println!("{line}");
        }
        if let Err(e) = result {
            panic!("seed {seed} ({succession:?}): {e}");
        }
        return;
    }
    let seeds = std::env::var("LEASE_MODEL_SEEDS")
        .ok()
        .map(|s| s.parse().expect("LEASE_MODEL_SEEDS is a number"))
        .unwrap_or(DEFAULT_SEEDS);
    let mut total = Stats::default();
    for seed in 0..seeds {
        let mut sim = Sim::new(seed, succession, false);
        if let Err(e) = sim.run() {
            // Deterministic: run it again, this time writing the trace.
            let mut again = Sim::new(seed, succession, true);
            let _ = again.run();
            let trace = again.trace.take().unwrap_or_default();
            let tail = &trace[trace.len().saturating_sub(TRACE_TAIL)..];
            panic!(
                "seed {seed} ({succession:?}, {:?}): {e}\nlast steps:\n{}\n\
                 replay: LEASE_MODEL_SEED={seed} cargo test -p failsafe-core \
                 --test lease_model {test} -- --nocapture",
                again.cfg,
                tail.join("\n")
            );
        }
        total.add(sim.stats);
    }
    println!("{succession:?}, {seeds} seeds × {STEPS} steps: {total:?}");
    // A model that never caches or never finishes a write proves nothing.
    assert!(total.hits > 0 && total.cached > 0, "{total:?}");
    assert!(total.completed > 0 && total.waited > 0, "{total:?}");
    assert!(total.leader_changes > 0 && total.freezes > 0, "{total:?}");
    // Nor one that never reads back a write or pushes a refresh.
    assert!(total.amended > 0 && total.pushed > 0, "{total:?}");
    assert!(total.suppressed > 0, "{total:?}");
}

#[test]
fn t10_close_to_open_holds_with_a_fenced_new_leader() {
    explore(
        Succession::Fence,
        "t10_close_to_open_holds_with_a_fenced_new_leader",
    );
}

#[test]
fn t20_close_to_open_holds_across_an_election_gap() {
    explore(
        Succession::ElectionGap,
        "t20_close_to_open_holds_across_an_election_gap",
    );
}
