//! The four ways reach sets up a stream ([`SetupModule`]), named here so
//! every module of this crate can say which made a stream without depending
//! on how any of them works. The type, its order and text form live in the
//! sans-IO planner, `reach_proto::setup_plan`, with the driver's decisions.

pub use reach_proto::setup_plan::{SetupModule, UnknownModule};
