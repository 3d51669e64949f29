//! Records the git commit the binary was built from, for `/system/info`.
//! `YMERA_GIT_SHA` in the build environment wins; outside a checkout it is
//! "unknown".

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=YMERA_GIT_SHA");
    println!("cargo:rerun-if-changed=../../.git/HEAD");
    println!("cargo:rerun-if-changed=../../.git/refs/heads");
    let sha = std::env::var("YMERA_GIT_SHA").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!(
        "cargo:rustc-env=YMERA_GIT_SHA={}",
        sha.unwrap_or_else(|| "unknown".into())
    );
}
