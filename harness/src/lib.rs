//! The test rig: real `fsd`, `mount-failsafe` and `wiki-cgi` processes on
//! this machine, started the way a sysadmin would start them.
//!
//! The integration tests of the daemon and the mount, the chaos harness, the
//! benchmarks (`failsafe-bench`, `wikibench`) and the demo (`failsafe-demo`) use it.
//! It starts the product's binaries as processes (found next to the running
//! executable, see [`local::sibling_binary`]) and talks to them only through
//! the client library, so it does not link the daemon; the product never
//! depends on it (the daemon only as a dev-dependency, for its tests). It
//! also runs Debian's unmodified DokuWiki with its state in a directory of
//! choice ([`dokuwiki`]).

pub mod browser;
pub mod dokuwiki;
pub mod httpc;
pub mod local;
pub mod logs;
pub mod netns;
pub mod relay;
