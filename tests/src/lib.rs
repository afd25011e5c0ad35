//! Harness for black-box pool tests (filled in by the process-level test work).
