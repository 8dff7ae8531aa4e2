//! End-to-end tests: drive the real `blockvault` binary against real files, the way a user does.

mod common;

mod agent;
mod backup_restore;
mod boot;
mod crash_and_concurrency;
mod damage;
mod files;
mod maintenance;
mod mount;
mod mount_security;
mod s3;
mod s3_errors;
mod s3_slow_link;
mod s3_support;
mod verify;
mod vhdx;
mod vhdx_builder;
