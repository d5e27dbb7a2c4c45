//! Programs, named after their attach points.

mod sock_addr;
mod verdict;
