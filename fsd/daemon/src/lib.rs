//! fsd
