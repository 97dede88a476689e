//! The rules the control plane and the data plane must agree on, defined once: the routing
//! policy and its defaults ([`settings`]), backend pools ([`pool`]), what a request costs ([`price`]), how a client presents and
//! how Sluice recognises a key ([`auth`]), the paths appended to a backend's base URL
//! ([`endpoint`]), and how text from outside is shown in logs and
//! terminals ([`text`], [`logging`]).
//!
//! Both servers depend on this crate and nothing here depends on either, so a rule changed
//! here changes for both (the proto crate stays generated code only; the conversions between
//! its messages and these types live here, beside the types).

pub mod auth;
pub mod cooldown;
pub mod endpoint;
pub mod logging;
pub mod pool;
pub mod price;
pub mod route;
pub mod settings;
pub mod text;
pub mod time;
