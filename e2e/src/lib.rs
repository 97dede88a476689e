//! Not published: the mock OpenAI provider ([`mock`]) and the harness that runs the real
//! binaries in end-to-end tests ([`process`]).

pub mod mock;
pub mod process;
