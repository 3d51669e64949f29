//! Records the git commit the binary was built from, for `/system/info`.
//! `YMERA_GIT_SHA` in the build environment wins; outside a checkout it is
//! "unknown".

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=YMERA_GIT_SHA");
    // Watch HEAD and the branch it points at, wherever git keeps them (a
    // worktree's `.git` is a file), and only files that exist: a missing
    // one would make cargo rebuild every time.
    for what in ["HEAD", "refs/heads"] {
        if let Some(path) = git(&["rev-parse", "--git-path", what])
            && Path::new(&path).exists()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
        && let Some(path) = git(&["rev-parse", "--git-path", &branch])
        && Path::new(&path).exists()
    {
        println!("cargo:rerun-if-changed={path}");
    }
    let sha = std::env::var("YMERA_GIT_SHA")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    println!(
        "cargo:rustc-env=YMERA_GIT_SHA={}",
        sha.unwrap_or_else(|| "unknown".into())
    );
}
