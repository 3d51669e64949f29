//! Records the git commit the binary was built from, for `--version` and
//! `/system/info`. `YMERA_GIT_SHA` in the build environment wins; outside a
//! checkout (a source tarball, a build without git) it is "unknown".

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
    // A tarball unpacked inside some other git checkout is not that
    // checkout's commit: git counts only if it tracks this very file.
    let tracked = git(&["ls-files", "--error-unmatch", "build.rs"]).is_some();
    let git = |args: &[&str]| if tracked { git(args) } else { None };
    // Rebuild when this checkout's commit changes, and only then: watch
    // HEAD (a checkout or a switch of branch) and the file of the branch it
    // points at (a commit), wherever git keeps them (a worktree's `.git` is
    // a file). Not the whole of refs/heads, which every commit on any branch
    // of a shared repository touches. A branch whose ref is packed has no
    // file until its next commit writes one: then refs/heads is watched
    // until it has. Only files that exist: a missing one would make cargo
    // rebuild every time.
    let watch = |path: &str| {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    };
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        watch(&head);
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        match git(&["rev-parse", "--git-path", &branch]) {
            Some(path) if Path::new(&path).exists() => watch(&path),
            _ => {
                for packed in ["packed-refs", "refs/heads"] {
                    if let Some(path) = git(&["rev-parse", "--git-path", packed]) {
                        watch(&path);
                    }
                }
            }
        }
    }
    let sha = std::env::var("YMERA_GIT_SHA")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    println!(
        "cargo:rustc-env=YMERA_GIT_SHA={}",
        sha.unwrap_or_else(|| "unknown".into())
    );
}
