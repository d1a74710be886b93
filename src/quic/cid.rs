//! Connection IDs a QUIC load balancer can route (QUIC-LB).
