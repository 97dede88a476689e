//! Not published: the mock OpenAI provider ([`mock`]), the harness that runs the real
//! binaries in end-to-end tests ([`process`]), and the benchmark driver ([`bench`]).

pub mod bench;
pub mod mock;
pub mod process;
