//! In-memory Store (tests and simulations).
