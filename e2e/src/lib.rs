//! Not published: the mock provider ([`mock`]: OpenAI's APIs and Anthropic's Messages), the
//! harness that runs the real binaries in end-to-end tests ([`process`]), the benchmark driver
//! ([`bench`]), and the log output of the binaries ([`logs`]).

pub mod bench;
pub mod certs;
pub mod logs;
pub mod mock;
pub mod process;
