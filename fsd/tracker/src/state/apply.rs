//! Validating and applying commands: `apply` runs each in its own savepoint
//! and records its result under its operation id (a batch, each of its
//! commands); `apply_op` hands each operation to the one function that
//! carries it out.

use crate::db::CachedSql;
use failsafe_core::MAX_INLINE_BYTES;
use failsafe_proto::pb::{self, command::Op, ErrorCode};
use prost::Message;
use rusqlite::{params, OptionalExtension, Transaction};

use super::{
    blocks, check_name, err, hosts, i, kept, namespace, sessions, ApplyError, OpError, OpResult,
};

/// Checks what can be checked without the database: names and ranges. The
/// service refuses such a command before it reaches the log.
pub(crate) fn validate(cmd: &pb::Command) -> Result<(), OpError> {
    match &cmd.op {
        None => err(ErrorCode::Invalid, "command without an operation"),
        Some(Op::Create(c)) => {
            check_name(&c.name)?;
            match &c.content {
                None => Ok(()),
                Some(x) if !c.exclusive || x.ino != 0 || x.append || x.truncate => err(
                    ErrorCode::Invalid,
                    "a create's content goes with an exclusive create of a new file",
                ),
                Some(x) if x.extents.len() > 4096 || x.copies.len() > 4096 => {
                    err(ErrorCode::Invalid, "at most 4096 extents per commit")
                }
                Some(x) => check_extents(&x.extents),
            }
        }
        Some(Op::Mkdir(c)) => check_name(&c.name),
        Some(Op::Symlink(c)) => check_name(&c.name),
        Some(Op::Link(c)) => check_name(&c.new_name),
        Some(Op::Unlink(c)) => check_name(&c.name),
        Some(Op::Rmdir(c)) => check_name(&c.name),
        Some(Op::Rename(c)) => check_name(&c.name).and_then(|()| check_name(&c.new_name)),
        Some(Op::CommitExtents(c)) if c.extents.len() > 4096 || c.copies.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 extents per commit")
        }
        Some(Op::CommitExtents(c)) => check_extents(&c.extents),
        Some(Op::ReplaceInline(c)) if c.extents.len() > 4096 || c.copies.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 extents per replacement")
        }
        Some(Op::RecordCopies(c)) if c.copies.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 blocks per record")
        }
        Some(Op::DropCopies(c)) if c.copies.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 blocks per drop")
        }
        Some(Op::ForgetBlocks(c)) if c.hashes.len() > 4096 => {
            err(ErrorCode::Invalid, "at most 4096 blocks per forget")
        }
        Some(Op::SetHostState(c))
            if !matches!(
                pb::HostAdminState::try_from(c.state),
                Ok(pb::HostAdminState::Active
                    | pb::HostAdminState::Away
                    | pb::HostAdminState::Draining)
            ) =>
        {
            err(
                ErrorCode::Invalid,
                "a host state is active, away or draining",
            )
        }
        Some(Op::Batch(b)) => {
            if b.commands.is_empty() {
                return err(ErrorCode::Invalid, "an empty batch");
            }
            for c in &b.commands {
                if matches!(c.op, Some(Op::Batch(_))) {
                    return err(ErrorCode::Invalid, "a batch inside a batch");
                }
                validate(c)?;
            }
            Ok(())
        }
        Some(_) => Ok(()),
    }
}

/// Each extent's shape, and at most `MAX_INLINE_BYTES` of inline data in
/// all: the Raft entry is the inline data's durable copy, and entries stay
/// small.
fn check_extents(extents: &[pb::Extent]) -> Result<(), OpError> {
    let mut inline = 0usize;
    for e in extents {
        blocks::check_extent(e)?;
        inline = inline.saturating_add(e.data.len());
    }
    if inline > MAX_INLINE_BYTES {
        return err(
            ErrorCode::Invalid,
            format!("{inline} bytes of inline data in one commit; at most {MAX_INLINE_BYTES}"),
        );
    }
    Ok(())
}

/// Applies one command in its own savepoint. A refused command changes
/// nothing but the record of its operation id, so a retry gets the same answer.
pub(crate) fn apply(
    tx: &Transaction<'_>,
    cmd: &pb::Command,
) -> rusqlite::Result<pb::CommandResult> {
    use pb::command_result::Result as R;
    if let Some(Op::Batch(b)) = &cmd.op {
        // The batch itself has no operation id and no savepoint: its
        // commands have theirs.
        let results = b
            .commands
            .iter()
            .map(|c| match c.op {
                Some(Op::Batch(_)) => Ok(refusal(ErrorCode::Invalid, "a batch inside a batch")),
                _ => apply(tx, c),
            })
            .collect::<rusqlite::Result<_>>()?;
        return Ok(pb::CommandResult {
            result: Some(R::Batch(pb::BatchResult { results })),
            changed: Vec::new(),
        });
    }
    if cmd.client_id != 0 {
        let prev: Option<Vec<u8>> = tx
            .row(
                "SELECT result FROM applied_ops WHERE client_id = ?1 AND op_id = ?2",
                params![i(cmd.client_id), i(cmd.op_id)],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(bytes) = prev {
            if let Ok(res) = pb::CommandResult::decode(bytes.as_slice()) {
                return Ok(res);
            }
        }
    }
    let mut changed = Vec::new();
    let result = {
        tx.exec("SAVEPOINT cmd", [])?;
        let mut touched = touched(tx, cmd)?;
        let mut found = Vec::new();
        match apply_op(tx, cmd, &mut found) {
            Ok(result) => {
                tx.exec("RELEASE cmd", [])?;
                if !found.is_empty() {
                    touched.extend(found);
                    touched.sort_unstable();
                    touched.dedup();
                }
                changed = touched;
                result
            }
            Err(ApplyError::Refused(e)) => {
                tx.exec("ROLLBACK TO cmd", [])?;
                tx.exec("RELEASE cmd", [])?;
                R::Error(pb::CommandError {
                    code: e.code as i32,
                    message: e.message,
                })
            }
            // Not a refusal: stop the batch. The caller's transaction rolls
            // back, savepoint and all.
            Err(ApplyError::Db(e)) => return Err(e),
        }
    };
    let result = pb::CommandResult {
        result: Some(result),
        changed,
    };
    if cmd.client_id != 0 {
        tx.exec(
            "INSERT OR REPLACE INTO applied_ops VALUES (?1, ?2, ?3, ?4)",
            params![
                i(cmd.client_id),
                i(cmd.op_id),
                if cmd.leader_ns > 0 {
                    cmd.leader_ns
                } else {
                    cmd.now_ns
                },
                result.encode_to_vec()
            ],
        )?;
    }
    Ok(result)
}

/// The inodes `cmd` will change if it applies: whose attributes, names (a
/// directory) or content leases on them must give up. Read before applying,
/// so a removed or replaced inode is still found by its name.
fn touched(tx: &Transaction<'_>, cmd: &pb::Command) -> rusqlite::Result<Vec<u64>> {
    let named = |parent: u64, name: &[u8]| -> rusqlite::Result<Option<u64>> {
        match namespace::lookup_ino(tx, parent, name) {
            Ok(ino) => Ok(ino),
            Err(ApplyError::Db(e)) => Err(e),
            Err(ApplyError::Refused(_)) => Ok(None),
        }
    };
    let mut out = failsafe_proto::known_touched(cmd);
    match &cmd.op {
        Some(Op::Unlink(c)) => out.extend(named(c.parent, &c.name)?),
        Some(Op::Rmdir(c)) => out.extend(named(c.parent, &c.name)?),
        Some(Op::Rename(c)) => {
            out.extend(named(c.parent, &c.name)?);
            out.extend(named(c.new_parent, &c.new_name)?);
        }
        _ => {}
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// The names `cmd` changes: (directory, name) pairs.
pub(crate) fn changed_names(cmd: &pb::Command) -> Vec<(u64, Vec<u8>)> {
    match &cmd.op {
        Some(Op::Create(c)) => vec![(c.parent, c.name.clone())],
        Some(Op::Mkdir(c)) => vec![(c.parent, c.name.clone())],
        Some(Op::Symlink(c)) => vec![(c.parent, c.name.clone())],
        Some(Op::Link(c)) => vec![(c.new_parent, c.new_name.clone())],
        Some(Op::Unlink(c)) => vec![(c.parent, c.name.clone())],
        Some(Op::Rmdir(c)) => vec![(c.parent, c.name.clone())],
        Some(Op::Rename(c)) => vec![
            (c.parent, c.name.clone()),
            (c.new_parent, c.new_name.clone()),
        ],
        Some(Op::Batch(b)) => {
            let mut all: Vec<_> = b.commands.iter().flat_map(changed_names).collect();
            all.sort_unstable();
            all.dedup();
            all
        }
        _ => Vec::new(),
    }
}

fn refusal(code: ErrorCode, message: &str) -> pb::CommandResult {
    pb::CommandResult {
        changed: Vec::new(),
        result: Some(pb::command_result::Result::Error(pb::CommandError {
            code: code as i32,
            message: message.into(),
        })),
    }
}

fn apply_op(
    tx: &Transaction<'_>,
    cmd: &pb::Command,
    changed: &mut Vec<u64>,
) -> OpResult<pb::command_result::Result> {
    use pb::command_result::Result as R;
    let now = cmd.now_ns;
    // What garbage collection judges by: the leader's clock, not a client's.
    let leader_now = if cmd.leader_ns > 0 {
        cmd.leader_ns
    } else {
        cmd.now_ns
    };
    let Some(op) = &cmd.op else {
        return err(ErrorCode::Invalid, "command without an operation");
    };
    let none = |()| R::Ok(pb::Empty {});
    match op {
        Op::Create(c) => {
            let a = namespace::create(tx, c, now)?;
            match &c.content {
                None => Ok(R::Attr(a)),
                Some(content) => {
                    let content = pb::CommitExtents {
                        ino: a.ino,
                        ..content.clone()
                    };
                    blocks::commit_extents(tx, &content, now, leader_now).map(R::Attr)
                }
            }
        }
        Op::Mkdir(c) => namespace::mkdir(tx, c, now).map(R::Attr),
        Op::Symlink(c) => namespace::symlink(tx, c, now).map(R::Attr),
        Op::Link(c) => namespace::link(tx, c, now).map(R::Attr),
        Op::Unlink(c) => namespace::unlink(tx, c, now, leader_now).map(none),
        Op::Rmdir(c) => namespace::rmdir(tx, c, now, leader_now).map(none),
        Op::Rename(c) => namespace::rename(tx, c, now, leader_now).map(none),
        Op::SetAttr(c) => namespace::set_attr(tx, c, now, leader_now).map(R::Attr),
        Op::CommitExtents(c) => blocks::commit_extents(tx, c, now, leader_now).map(R::Attr),
        Op::ReplaceInline(c) => blocks::replace_inline(tx, c, leader_now).map(none),
        Op::RecordCopies(c) => blocks::record_copies(tx, &c.copies, leader_now).map(none),
        Op::DropCopies(c) => blocks::drop_copies(tx, &c.copies, c.keep as usize).map(none),
        Op::ForgetBlocks(c) => blocks::forget_blocks(tx, &c.hashes, c.idle_before_ns).map(none),
        Op::RegisterHost(c) => hosts::register_host(tx, c, leader_now).map(none),
        Op::SetHostState(c) => hosts::set_host_state(tx, c, leader_now).map(none),
        Op::RemoveHost(c) => hosts::remove_host(tx, c).map(none),
        Op::Revoke(c) => hosts::revoke(tx, c, leader_now).map(none),
        Op::ReportDevices(c) => {
            hosts::report_devices(tx, c.host_id, &c.devices, leader_now).map(none)
        }
        Op::OpenSession(c) => sessions::open_session(tx, c, now).map(none),
        Op::Heartbeat(c) => sessions::heartbeat(tx, c, now).map(none),
        Op::CloseSession(c) => sessions::close_session(tx, c).map(none),
        Op::ExpireSessions(_) => sessions::expire_sessions(tx, now).map(none),
        Op::Lock(c) => sessions::lock(tx, c).map(none),
        Op::SetTrashPolicy(c) => kept::set_policy(tx, c).map(none),
        Op::RestoreTrash(c) => kept::restore(tx, c, now, leader_now, changed).map(R::Outcome),
        Op::PurgeTrash(c) => kept::purge(tx, c, leader_now).map(R::Outcome),
        Op::ExpireTrash(_) => kept::expire(tx, leader_now).map(R::Outcome),
        Op::CreateSnapshot(c) => kept::create_snapshot(tx, c, leader_now).map(R::Outcome),
        Op::DeleteSnapshot(c) => kept::delete_snapshot(tx, c, leader_now).map(R::Outcome),
        // `apply` takes a batch apart before it gets here.
        Op::Batch(_) => err(ErrorCode::Invalid, "a batch inside a batch"),
    }
}

#[cfg(test)]
mod tests {
    use failsafe_core::ROOT_INO;
    use failsafe_proto::pb::{self, command::Op, command_result::Result as R, ErrorCode};

    use super::apply;
    use crate::state::testing::{db, run};

    fn mkdir(name: &[u8]) -> pb::Command {
        pb::Command {
            now_ns: 1,
            op: Some(Op::Mkdir(pb::Mkdir {
                parent: ROOT_INO,
                name: name.to_vec(),
                mode: 0o755,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_refusal_is_an_answer_and_a_database_fault_is_not() {
        let mut conn = db();
        let r = run(&mut conn, mkdir(b"d").op.expect("op"));
        assert!(matches!(r.result, Some(R::Attr(_))), "{r:?}");
        // Refused, in the middle of a batch that goes on and commits.
        let tx = conn.transaction().expect("transaction");
        let refused = apply(&tx, &mkdir(b"d")).expect("a refusal is not an error");
        let Some(R::Error(e)) = refused.result else {
            panic!("{refused:?}")
        };
        assert_eq!(e.code, ErrorCode::Exists as i32);
        let r = apply(&tx, &mkdir(b"e")).expect("apply");
        assert!(matches!(r.result, Some(R::Attr(_))), "{r:?}");
        tx.commit().expect("commit");
        // The database failing is an error, never a refusal.
        conn.execute_batch("DROP TABLE dentries").expect("drop");
        let tx = conn.transaction().expect("transaction");
        assert!(apply(&tx, &mkdir(b"f")).is_err());
    }

    fn with_id(mut cmd: pb::Command, op_id: u64) -> pb::Command {
        cmd.client_id = 7;
        cmd.op_id = op_id;
        cmd
    }

    fn batch(commands: Vec<pb::Command>) -> pb::Command {
        pb::Command {
            op: Some(Op::Batch(pb::Batch { commands })),
            ..Default::default()
        }
    }

    fn results(r: pb::CommandResult) -> Vec<pb::CommandResult> {
        match r.result {
            Some(R::Batch(b)) => b.results,
            other => panic!("not a batch result: {other:?}"),
        }
    }

    #[test]
    fn a_refused_command_in_a_batch_fails_alone() {
        let mut conn = db();
        let entry = batch(vec![
            with_id(mkdir(b"a"), 1),
            with_id(mkdir(b"a"), 2),
            with_id(mkdir(b"b"), 3),
        ]);
        super::validate(&entry).expect("a valid batch");
        let tx = conn.transaction().expect("transaction");
        let r = results(apply(&tx, &entry).expect("apply"));
        tx.commit().expect("commit");
        assert_eq!(r.len(), 3);
        assert!(matches!(r[0].result, Some(R::Attr(_))), "{r:?}");
        assert!(
            matches!(&r[1].result, Some(R::Error(e)) if e.code == ErrorCode::Exists as i32),
            "{r:?}"
        );
        assert!(matches!(r[2].result, Some(R::Attr(_))), "{r:?}");
        let names: Vec<Vec<u8>> = conn
            .prepare("SELECT name FROM dentries WHERE parent = ?1 ORDER BY name")
            .expect("prepare")
            .query_map([ROOT_INO as i64], |row| row.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(names, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn a_batch_applied_again_changes_nothing_and_answers_the_same() {
        let mut conn = db();
        let entry = batch(vec![with_id(mkdir(b"a"), 1), with_id(mkdir(b"b"), 2)]);
        let tx = conn.transaction().expect("transaction");
        let first = apply(&tx, &entry).expect("apply");
        tx.commit().expect("commit");
        // The same entry again (a replay), then one of its commands retried
        // alone at another leader: each answers from its first application.
        let tx = conn.transaction().expect("transaction");
        let again = apply(&tx, &entry).expect("apply");
        let alone = apply(&tx, &with_id(mkdir(b"b"), 2)).expect("apply");
        tx.commit().expect("commit");
        assert_eq!(first, again);
        assert_eq!(results(first)[1], alone);
    }

    #[test]
    fn batches_do_not_nest_and_are_not_empty() {
        assert!(super::validate(&batch(vec![])).is_err());
        assert!(super::validate(&batch(vec![batch(vec![mkdir(b"a")])])).is_err());
        assert!(super::validate(&batch(vec![mkdir(b"bad/name")])).is_err());
    }

    fn create_with(name: &[u8], exclusive: bool, data: &[u8]) -> pb::Command {
        pb::Command {
            now_ns: 1,
            op: Some(Op::Create(pb::Create {
                parent: ROOT_INO,
                name: name.to_vec(),
                mode: 0o644,
                exclusive,
                content: Some(pb::CommitExtents {
                    extents: vec![failsafe_proto::inline_extent(0, data)],
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_file_is_created_with_its_bytes_in_one_command_or_not_at_all() {
        let mut conn = db();
        let cmd = create_with(b"page.txt", true, b"the text");
        super::validate(&cmd).expect("valid");
        let r = run(&mut conn, cmd.op.clone().expect("op"));
        let Some(R::Attr(a)) = r.result else {
            panic!("{r:?}")
        };
        assert_eq!(a.size, 8);
        let fe = crate::state::testing::extents(&conn, a.ino);
        assert_eq!(fe.extents.len(), 1);
        assert_eq!(fe.extents[0].data, b"the text");
        // Again: the name exists, so nothing is created nor written.
        let again = run(&mut conn, cmd.op.expect("op"));
        let Some(R::Error(e)) = again.result else {
            panic!("{again:?}")
        };
        assert_eq!(e.code, ErrorCode::Exists as i32);
        assert_eq!(
            crate::state::testing::extents(&conn, a.ino).extents[0].data,
            b"the text"
        );
        // Content only with an exclusive create of a new file.
        assert!(super::validate(&create_with(b"other", false, b"x")).is_err());
    }

    #[test]
    fn an_unlink_or_rename_that_expects_other_files_changes_nothing() {
        use crate::state::testing::create_file;
        let mut conn = db();
        let (a, b) = (create_file(&mut conn, b"a"), create_file(&mut conn, b"b"));
        let code = |r: pb::CommandResult| match r.result {
            Some(R::Error(e)) => Some(e.code),
            _ => None,
        };
        let changed = Some(ErrorCode::Changed as i32);
        let unlink = |name: &[u8], expect| {
            Op::Unlink(pb::Unlink {
                parent: ROOT_INO,
                name: name.to_vec(),
                expect,
            })
        };
        let rename = |expect, expect_over, no_replace| {
            Op::Rename(pb::Rename {
                parent: ROOT_INO,
                name: b"a".to_vec(),
                new_parent: ROOT_INO,
                new_name: b"b".to_vec(),
                no_replace,
                expect,
                expect_over,
                ..Default::default()
            })
        };
        assert_eq!(code(run(&mut conn, unlink(b"a", b))), changed);
        assert_eq!(code(run(&mut conn, rename(b, 0, false))), changed);
        assert_eq!(code(run(&mut conn, rename(a, a, false))), changed);
        assert_eq!(
            code(run(&mut conn, rename(a, 0, true))),
            Some(ErrorCode::Exists as i32)
        );
        // What they expect: applied.
        assert_eq!(code(run(&mut conn, rename(a, b, false))), None);
        assert_eq!(code(run(&mut conn, unlink(b"b", a))), None);
    }
}
