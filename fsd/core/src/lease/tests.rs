//! The lease rules' unit tests.

use super::*;

const CFG: LeaseConfig = LeaseConfig {
    lease_ms: 400,
    drift_ms: 20,
    hot_ms: 5_000,
};

#[test]
fn a_change_waits_for_each_holder_until_it_acknowledges_or_runs_out() {
    let mut l = Leases::new(CFG, 0);
    for h in [1, 2, 3] {
        l.connect(h);
        assert!(l.renew(h, 100));
    }
    assert_eq!(l.grant(1, &[10], 100), vec![true]);
    assert_eq!(l.grant(2, &[10, 11], 100), vec![true, true]);
    // Holder 3 changes 10: 1 and 2 are told, 3 is not waited for.
    let (id, tell) = l.begin_change(&[10], Some(3), 200);
    assert_eq!(tell, vec![1, 2]);
    // No grant of 10 while it changes.
    assert_eq!(l.grant(3, &[10], 200), vec![false]);
    assert_eq!(l.poll_change(id, 200), ChangePoll::WaitUntil(520));
    l.ack(1, id);
    assert_eq!(l.poll_change(id, 210), ChangePoll::WaitUntil(520));
    // Holder 2 never answers: its leases run out at 520.
    assert_eq!(l.poll_change(id, 520), ChangePoll::Done);
    l.end_change(id);
    assert_eq!(l.grant(1, &[10], 530), vec![false], "run out");
    assert!(!l.renew(1, 530), "run out: it must start over");
    l.connect(1);
    assert!(l.renew(1, 530));
    assert_eq!(l.grant(1, &[10], 530), vec![true]);
}

#[test]
fn grants_need_a_live_renewed_stream_and_do_not_extend_it() {
    let mut l = Leases::new(CFG, 0);
    assert_eq!(l.grant(1, &[10], 0), vec![false]);
    l.connect(1);
    assert_eq!(l.grant(1, &[10], 0), vec![false], "not renewed yet");
    assert!(l.renew(1, 0));
    assert_eq!(l.grant(1, &[10], 100), vec![true]);
    assert_eq!(l.grant(1, &[11], 420), vec![false], "run out");
    l.disconnect(1);
    assert!(!l.renew(1, 430));
}

#[test]
fn an_object_two_holders_change_turns_hot_and_is_not_leased() {
    let mut l = Leases::new(CFG, 0);
    for h in [1, 2] {
        l.connect(h);
        l.renew(h, 0);
    }
    let (a, _) = l.begin_change(&[10], Some(1), 10);
    l.end_change(a);
    let (b, _) = l.begin_change(&[10], Some(2), 20);
    l.end_change(b);
    assert_eq!(l.grant(1, &[10], 30), vec![false]);
    // (Its leases ran out meanwhile: it starts over.)
    l.connect(1);
    assert!(l.renew(1, 5_100));
    assert_eq!(l.grant(1, &[10], 5_100), vec![true]);
}

#[test]
fn what_a_holder_that_has_gone_changed_does_not_turn_hot() {
    // A web host's mount restarts: the old process (holder 1) changed the
    // directory, its stream closed and its leases ran out; the new one
    // (holder 2) changes it within `hot_ms` and may still lease it.
    let mut l = Leases::new(CFG, 0);
    l.connect(1);
    l.renew(1, 0);
    let (a, _) = l.begin_change(&[10], Some(1), 10);
    l.end_change(a);
    l.disconnect(1);
    l.connect(2);
    assert!(l.renew(2, 900));
    let (b, _) = l.begin_change(&[10], Some(2), 900);
    l.end_change(b);
    assert_eq!(l.grant(2, &[10], 910), vec![true]);
    // While it is still connected, or its leases last, it counts.
    l.connect(3);
    assert!(l.renew(3, 920));
    let (c, _) = l.begin_change(&[10], Some(3), 930);
    l.end_change(c);
    assert_eq!(
        l.grant(3, &[10], 940),
        vec![false],
        "two present holders: hot"
    );
}

#[test]
fn a_refused_grant_says_why() {
    let mut l = Leases::new(CFG, 0);
    // Not connected: gone.
    assert_eq!(l.grant_why(1, &[10], 0), vec![Err(Refusal::HolderGone)]);
    l.connect(1);
    assert!(l.renew(1, 0));
    l.connect(2);
    assert!(l.renew(2, 0));
    // A change on its way.
    let (a, _) = l.begin_change(&[10], Some(1), 10);
    assert_eq!(
        l.grant_why(2, &[11, 10], 10),
        vec![Ok(()), Err(Refusal::Changing)]
    );
    l.end_change(a);
    // Changed by two holders within hot_ms.
    let (b, _) = l.begin_change(&[10], Some(2), 20);
    l.end_change(b);
    assert_eq!(l.grant_why(2, &[10], 30), vec![Err(Refusal::Hot)]);
    // Delegated to another holder.
    assert!(l.delegate(1, 12, 40));
    assert_eq!(l.grant_why(2, &[12], 40), vec![Err(Refusal::Delegated)]);
    assert_eq!(l.grant(1, &[12], 40), vec![true]);
}

#[test]
fn a_new_leader_fences_its_first_changes() {
    let mut l = Leases::new(CFG, 1_000);
    let (id, tell) = l.begin_change(&[10], None, 600);
    assert!(tell.is_empty());
    assert_eq!(l.poll_change(id, 600), ChangePoll::WaitUntil(1_000));
    assert_eq!(l.poll_change(id, 1_000), ChangePoll::Done);
}

#[test]
fn an_answer_to_a_read_in_flight_across_an_invalidation_is_not_cached() {
    let mut v: HolderView<&str> = HolderView::new(400);
    let e = v.reconnected();
    v.renewed(e, 0);
    let before = v.read_sent();
    v.invalidate(&[10]);
    let after = v.read_sent();
    assert!(!v.offer(before, 10, "old or new", true, 10));
    v.read_done(before);
    assert!(v.offer(after, 10, "new", true, 10));
    v.read_done(after);
    assert_eq!(v.get(10, 10), Some(&"new"));
    assert_eq!(v.get(10, 400), None, "run out");
}

#[test]
fn an_own_change_read_back_is_cached_unless_something_invalidated_it_meanwhile() {
    let mut v: HolderView<String> = HolderView::new(400);
    let e = v.reconnected();
    v.renewed(e, 0);
    let older = v.read_sent();
    let change = v.read_sent();
    // Read back after the change: cached, in place.
    assert_eq!(v.amend(change, 10, true, 5, |s| s.push_str("mine")), None);
    assert_eq!(v.get(10, 5).map(String::as_str), Some("mine"));
    // A read sent before the change is not cached over it.
    assert!(!v.offer(older, 10, "before".into(), true, 6));
    v.read_done(older);
    v.read_done(change);
    // Invalidated while the change was on its way: dropped instead.
    let change = v.read_sent();
    v.invalidate(&[10]);
    let read = v.read_sent();
    assert!(v.offer_with(read, 11, true, 7, |s| s.push('x')));
    v.read_done(read);
    assert_eq!(v.amend(change, 10, true, 8, |s| s.push_str("stale")), None);
    assert_eq!(v.get(10, 8), None);
    // Not granted: dropped, and what was cached is handed back.
    let change = v.read_sent();
    assert_eq!(
        v.amend(change, 11, false, 9, |s| s.push('y')),
        Some("x".to_string())
    );
    assert_eq!(v.get(11, 9), None);
}

// The model test (tests/lease_model/) found each of the following.

/// A leader whose `holders` connected and renewed at 0, and the view of
/// the first of them.
fn streaming(holders: &[Holder]) -> (Leases, HolderView<&'static str>) {
    let mut l = Leases::new(CFG, 0);
    let mut v = HolderView::new(CFG.lease_ms);
    let e = v.reconnected();
    for &h in holders {
        l.connect(h);
        assert!(l.renew(h, 0));
    }
    v.renewed(e, 0);
    (l, v)
}

#[test]
fn issue_12_a_second_change_waits_for_whom_the_first_still_waits_for() {
    let mut l = Leases::new(CFG, 0);
    for h in [1, 2] {
        l.connect(h);
        assert!(l.renew(h, 0));
    }
    assert_eq!(l.grant(1, &[10], 0), vec![true]);
    // 1 caches version 1; change A makes version 2 and tells 1, whose
    // stream is slow.
    let (a, tell) = l.begin_change(&[10], None, 10);
    assert_eq!(tell, vec![1]);
    // Change B makes version 3 before 1 heard of A. Were B done at
    // once, 1 would still answer version 1 after B's writer heard.
    let (b, tell) = l.begin_change(&[10], Some(2), 20);
    assert_eq!(tell, vec![1]);
    assert_eq!(l.poll_change(b, 20), ChangePoll::WaitUntil(420));
    l.ack(1, a);
    assert_eq!(l.poll_change(b, 30), ChangePoll::WaitUntil(420));
    l.ack(1, b);
    assert_eq!(l.poll_change(b, 40), ChangePoll::Done);
}

#[test]
fn issue_12_a_renewal_that_arrives_after_the_leases_ran_out_is_refused() {
    let (mut l, mut v) = streaming(&[1]);
    let t = v.read_sent();
    assert_eq!(l.grant(1, &[10], 5), vec![true]);
    assert!(v.offer(t, 10, "version 1", true, 10));
    v.read_done(t);
    // 1's stream stalls with a renewal sent at 300 in it. Its leases
    // run out at 420 here; a change at 430 neither tells nor waits.
    let (c, tell) = l.begin_change(&[10], None, 430);
    assert!(tell.is_empty());
    assert_eq!(l.poll_change(c, 430), ChangePoll::Done);
    // The renewal arrives at 440. Answering it would let 1 use
    // "version 1" until 700.
    assert!(!l.renew(1, 440));
    v.lost();
    let e = v.reconnected();
    l.connect(1);
    assert!(l.renew(1, 450));
    v.renewed(e, 445);
    assert_eq!(v.get(10, 450), None);
}

#[test]
fn issue_12_a_read_granted_before_a_change_and_done_after_it_is_not_cached() {
    let (mut l, mut v) = streaming(&[1]);
    let t = v.read_sent();
    assert_eq!(l.grant(1, &[10], 5), vec![true]);
    // A change lands between the grant and the read: 1 is told, and
    // its grant is taken back.
    let (a, tell) = l.begin_change(&[10], None, 6);
    assert_eq!(tell, vec![1]);
    v.invalidate(&[10]);
    l.ack(1, a);
    assert_eq!(l.poll_change(a, 8), ChangePoll::Done);
    l.end_change(a);
    // The read returns the new version, but a later change would not
    // tell 1: caching it would go stale.
    assert!(!v.offer(t, 10, "version 2", true, 9));
    v.read_done(t);
    let (_, tell) = l.begin_change(&[10], None, 20);
    assert!(tell.is_empty());
}

#[test]
fn issue_12_the_writer_stays_a_holder_and_its_read_in_flight_is_not_cached() {
    let (mut l, mut v) = streaming(&[1, 2]);
    // 1 reads 10 (granted, version 1 read), then changes it itself.
    let t = v.read_sent();
    assert_eq!(l.grant(1, &[10], 5), vec![true]);
    let (a, tell) = l.begin_change(&[10], Some(1), 10);
    assert!(tell.is_empty(), "the writer is not waited for");
    assert_eq!(l.poll_change(a, 10), ChangePoll::Done);
    l.end_change(a);
    // Its read may still be answered with version 1, before or after
    // it hears of its own change: the next change must tell it...
    let (_, tell) = l.begin_change(&[10], Some(2), 20);
    assert_eq!(tell, vec![1]);
    // ...and once it forgot what it changed, the answer is not cached.
    v.forget(10, 30);
    assert!(!v.offer(t, 10, "version 1", true, 30));
    v.read_done(t);
}

/// Change `id`, which told holder `h`, acknowledged and ended at `now`.
fn acked(l: &mut Leases, h: Holder, id: ChangeId, now: u64) {
    l.ack(h, id);
    assert_eq!(l.poll_change(id, now), ChangePoll::Done);
    l.end_change(id);
}

#[test]
fn issue_12_a_refresh_pushed_before_a_holders_own_change_is_not_cached_after_its_answer() {
    // Holder 1's view streams with epoch 1.
    let (mut l, mut v) = streaming(&[1]);
    assert_eq!(l.grant(1, &[10], 5), vec![true]);
    // Change A (version 2) tells 1, which drops 10 and acknowledges.
    let (a, tell) = l.begin_change(&[10], None, 10);
    assert_eq!(tell, vec![1]);
    v.invalidate(&[10]);
    acked(&mut l, 1, a, 12);
    // A's refresh: 1 registered again, version 2 read and pushed, on a
    // slow stream.
    let mark = l.change_mark();
    assert_eq!(l.grant(1, &[10], 20), vec![true]);
    assert!(!l.begun_since(&[10], mark));
    // 1 makes version 3 itself: not told, nothing after the refresh on its
    // stream. It hears, with version 3 read back, before the refresh.
    let t = v.read_sent();
    let (b, tell) = l.begin_change(&[10], Some(1), 30);
    assert!(tell.is_empty());
    assert_eq!(l.poll_change(b, 30), ChangePoll::Done);
    l.end_change(b);
    assert_eq!(l.grant(1, &[10], 31), vec![true]);
    assert_eq!(v.amend(t, 10, true, 40, |s| *s = "version 3"), None);
    v.read_done(t);
    // Cached, version 2 would stay until the next change of 10.
    assert!(!v.pushed(1, 10, 50, |s| *s = "version 2"));
    assert_eq!(v.get(10, 50), Some(&"version 3"));
    // So would any refresh until a renewal sent after the answer is
    // answered: the leader sent it after every earlier push.
    v.renewed(1, 40);
    assert!(!v.pushed(1, 10, 55, |s| *s = "version 3"));
    v.renewed(1, 45);
    assert!(v.pushed(1, 10, 60, |s| *s = "version 3"));
    // The same for a change not read back (dropped instead).
    v.take_own(&[10], 70);
    assert!(!v.pushed(1, 10, 80, |s| *s = "version 3"));
    assert_eq!(v.get(10, 80), None);
}

#[test]
fn issue_12_a_refresh_is_not_pushed_after_a_change_whose_object_was_forgotten() {
    let (mut l, _) = streaming(&[1]);
    assert_eq!(l.grant(1, &[10], 5), vec![true]);
    let (a, _) = l.begin_change(&[10], None, 10);
    acked(&mut l, 1, a, 12);
    // A's refresh registers 1 again and reads version 2...
    let mark = l.change_mark();
    assert_eq!(l.grant(1, &[10], 20), vec![true]);
    // ...then change B (version 3) tells 1, takes its grant back and is
    // done, and nobody holds 10 any more: the table forgets it.
    let (b, tell) = l.begin_change(&[10], None, 21);
    assert_eq!(tell, vec![1]);
    acked(&mut l, 1, b, 22);
    l.expire(23);
    assert_eq!(l.sizes(), (1, 0));
    // Pushed now, version 2 would be cached after B's invalidation, and 1
    // is not told of 10's changes any more.
    assert!(l.begun_since(&[10], mark));
    let (_, tell) = l.begin_change(&[10], None, 30);
    assert!(tell.is_empty());
    // A mark taken after all that is not held back.
    let later = l.change_mark();
    assert!(!l.begun_since(&[10], later));
}

#[test]
fn issue_12_a_refresh_is_not_pushed_to_a_holder_whose_grants_expire_dropped() {
    // While a refresh is read, 1's stream breaks and it opens another; the
    // table expires what ran out before its first renewal there, or after.
    for dropped in [true, false] {
        let (mut l, _) = streaming(&[1]);
        let mark = l.change_mark();
        assert_eq!(l.grant(1, &[10], 5), vec![true]);
        l.disconnect(1);
        l.connect(1);
        if dropped {
            l.expire(10);
        }
        assert!(l.renew(1, 20));
        l.expire(25);
        // Pushed on its new stream, renewed, the refresh would be cached:
        // not when 1 is no longer told of 10's changes.
        assert_eq!(l.begun_since(&[10], mark), dropped);
        let (_, tell) = l.begin_change(&[10], None, 30);
        assert_eq!(tell.is_empty(), dropped);
    }
}

#[test]
fn a_grant_from_an_earlier_stream_is_not_cached() {
    let mut v: HolderView<&str> = HolderView::new(400);
    let e = v.reconnected();
    v.renewed(e, 0);
    let t = v.read_sent();
    let e2 = v.reconnected();
    v.renewed(e2, 5);
    assert!(!v.offer(t, 10, "from the old leader", true, 10));
    v.read_done(t);
    assert_eq!(v.get(10, 10), None);
}

#[test]
fn a_directory_is_delegated_only_to_a_holder_alone_and_then_leased_to_nobody_else() {
    let mut l = Leases::new(CFG, 0);
    for h in [1, 2] {
        l.connect(h);
        assert!(l.renew(h, 0));
    }
    assert_eq!(l.grant(2, &[10], 10), vec![true]);
    assert!(!l.delegate(1, 10, 10), "2 holds it too");
    assert!(l.delegate(1, 11, 10));
    assert!(l.delegate(1, 11, 20), "again, the same holder");
    assert_eq!(l.delegate_of(11, 20), Some(1));
    assert_eq!(l.grant(2, &[11], 20), vec![false], "delegated to 1");
    assert_eq!(l.grant(1, &[11], 20), vec![true]);
    assert!(!l.delegate(2, 11, 20));
    // Its leases run out: so does the delegation.
    assert!(l.renew(2, 300));
    l.expire(430);
    assert_eq!(l.delegate_of(11, 430), None);
    assert_eq!(l.grant(2, &[11], 430), vec![true]);
}

#[test]
fn a_recall_waits_for_the_delegate_before_anyone_else_changes_or_reads() {
    let mut l = Leases::new(CFG, 0);
    for h in [1, 2] {
        l.connect(h);
        assert!(l.renew(h, 0));
    }
    assert!(l.delegate(1, 11, 10));
    // The delegate's own change needs no recall and waits for nobody.
    assert_eq!(l.begin_recall(&[11], Some(1), 20), None);
    let (own, tell) = l.begin_change(&[11], Some(1), 20);
    assert!(tell.is_empty());
    assert_eq!(l.poll_change(own, 20), ChangePoll::Done);
    l.end_change(own);
    assert_eq!(l.delegate_of(11, 30), Some(1), "still 1's after its change");
    // Another client reads it: 1 is told, and until it answers nothing
    // of 11 is granted and the read waits.
    let (id, tell) = l.begin_recall(&[11, 12], Some(2), 40).expect("a recall");
    assert_eq!(tell, vec![1]);
    assert_eq!(l.grant(2, &[11], 40), vec![false]);
    assert_eq!(l.poll_change(id, 40), ChangePoll::WaitUntil(420));
    // Meanwhile the delegate commits what it did (its flush), then answers.
    let (flush, tell) = l.begin_change(&[11], Some(1), 50);
    assert!(tell.is_empty(), "the delegate's flush waits for nobody");
    assert_eq!(l.poll_change(flush, 50), ChangePoll::Done);
    l.end_change(flush);
    l.ack(1, id);
    assert_eq!(l.poll_change(id, 60), ChangePoll::Done);
    l.end_change(id);
    assert_eq!(l.delegate_of(11, 60), None, "taken back");
    assert_eq!(l.grant(2, &[11], 60), vec![true]);
    // A delegate that never answers holds a recall up until its leases
    // run out, no longer.
    assert!(l.renew(1, 100));
    assert!(l.delegate(1, 13, 100));
    let (id, tell) = l.begin_recall(&[13], None, 110).expect("a recall");
    assert_eq!(tell, vec![1]);
    assert_eq!(l.poll_change(id, 110), ChangePoll::WaitUntil(520));
    assert_eq!(l.poll_change(id, 520), ChangePoll::Done);
    l.end_change(id);
    assert_eq!(l.delegate_of(13, 520), None);
}

#[test]
fn a_flush_is_admitted_only_from_the_delegate_and_holds_a_recall_until_it_applied() {
    let mut l = Leases::new(CFG, 0);
    for h in [1, 2] {
        l.connect(h);
        assert!(l.renew(h, 0));
    }
    assert!(l.delegate(1, 11, 10));
    assert!(!l.begin_flush(2, 11, 20), "not 2's");
    assert!(!l.begin_flush(1, 12, 20), "12 is nobody's");
    assert_eq!(l.delegated(), vec![11]);
    assert!(l.begin_flush(1, 11, 20));
    let (id, tell) = l.begin_recall(&[11], Some(2), 30).expect("a recall");
    assert_eq!(tell, vec![1]);
    // The delegate's leases run out while its flush is under way: the
    // recall still waits for the flush, which comes first.
    assert!(matches!(l.poll_change(id, 500), ChangePoll::WaitUntil(_)));
    l.end_flush(11);
    assert_eq!(l.poll_change(id, 500), ChangePoll::Done);
    l.end_change(id);
    assert!(!l.begin_flush(1, 11, 510), "recalled: too late to flush");
    assert!(l.delegated().is_empty());
}
