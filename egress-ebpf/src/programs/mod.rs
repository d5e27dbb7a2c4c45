//! Programs, named after their attach points.

mod addr;
mod backstop;
mod binding;
mod dns;
mod inbound;
mod name_bind;
mod recent;
mod restore;
mod sock_addr;
mod sock_create;
mod socket_family;
mod trace;
mod tripwire;
mod verdict;
