//! PCI: configuration space, the root bus and its config mechanisms, and
//! the interrupt plumbing functions share (MSI-X, INTx).

pub mod config;
pub mod intx;
pub mod msix;
pub mod root;
