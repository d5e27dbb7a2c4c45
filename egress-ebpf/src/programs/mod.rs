//! Programs, named after their attach points.

mod dns;
mod restore;
mod sock_addr;
mod sock_create;
mod verdict;
