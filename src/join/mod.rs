//! Join state.
