//! Architecture-specific parts of the machine. Only x86_64 exists.

pub mod x86_64;
