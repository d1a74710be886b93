//! QUIC: the endpoint, its configuration, and connection IDs a load balancer
//! can route.

pub mod cid;
