//! Conformance tests every Store backend must pass.
