//! The gridforge agent engine: everything that turns an image and a layout into a guest disk.
//! The CLI (and later the gRPC daemon) only translate requests into calls on this library.

pub mod block;
pub mod fs;
pub mod image;
pub mod partition;
pub mod pipeline;
pub mod progress;
