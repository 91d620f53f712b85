//! The llama model and its sub-block API.
