//! partition (in progress)
