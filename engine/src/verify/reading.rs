//! Reading the chosen packs: the store is read ahead of the decoder, so neither waits for the
//! other.
//!
//! Each pack is decoded on every core, so two decodes at once keep the cores busy. When one job
//! both fetched and decoded its pack, the store sat idle while both jobs decoded, and the cores
//! waited while both fetched: from a cold disk, verify took about as long as reading and
//! decoding one after the other (docs/BENCHMARKS.md, "Verify reads ahead"). Here fetches run on
//! their own, up to `fetch_ahead` packs beyond the ones being decoded, so memory holds at most
//! `fetch_ahead + DECODES_AT_ONCE` packs whatever the repository's size.

use std::collections::VecDeque;
use std::future::Future;

use blockvault_repo::{PackResult, Repository, Unchecked};
use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::StreamExt;

use super::PackJob;

/// Packs decoded at once (each on every core).
const DECODES_AT_ONCE: usize = 2;

/// Fetches and checks every job's pack, handing each outcome to `done` with the bytes the job
/// is charged for, in the order the checks finish.
pub async fn read_packs(
    repo: &Repository,
    jobs: Vec<PackJob>,
    fetch_ahead: usize,
    done: impl FnMut(u64, Result<PackResult, Unchecked>),
) {
    pipeline(
        jobs,
        fetch_ahead,
        DECODES_AT_ONCE,
        |(id, size, charged, part)| async move { (charged, repo.fetch_pack(id, size, part).await) },
        |pack| repo.check_fetched(pack),
        done,
    )
    .await
}

/// Runs `fetch` on each job, at most `ahead` fetched or fetching beyond the `decodes` being
/// decoded, and `decode` on each fetched item in the order the jobs came. A fetch that fails
/// goes to `done` at once.
async fn pipeline<J, F, E, T, FF, DF>(
    jobs: Vec<J>,
    ahead: usize,
    decodes: usize,
    fetch: impl Fn(J) -> FF,
    decode: impl Fn(F) -> DF,
    mut done: impl FnMut(u64, Result<T, E>),
) where
    FF: Future<Output = (u64, Result<F, E>)>,
    DF: Future<Output = Result<T, E>>,
{
    let (ahead, decodes) = (ahead.max(1), decodes.max(1));
    let mut jobs = jobs.into_iter();
    let mut fetching = FuturesOrdered::new();
    let mut fetched: VecDeque<(u64, F)> = VecDeque::new();
    let mut decoding = FuturesUnordered::new();
    loop {
        while fetching.len() + fetched.len() < ahead {
            let Some(job) = jobs.next() else { break };
            fetching.push_back(fetch(job));
        }
        while decoding.len() < decodes {
            let Some((charged, item)) = fetched.pop_front() else {
                break;
            };
            let d = decode(item);
            decoding.push(async move { (charged, d.await) });
        }
        if fetching.is_empty() && decoding.is_empty() {
            // Nothing waits in `fetched` either: it would be decoding.
            return;
        }
        tokio::select! {
            Some((charged, r)) = fetching.next(), if !fetching.is_empty() => match r {
                Ok(item) => fetched.push_back((charged, item)),
                Err(e) => done(charged, Err(e)),
            },
            Some((charged, r)) = decoding.next(), if !decoding.is_empty() => done(charged, r),
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use tokio::sync::Semaphore;

    use super::*;

    /// While decodes are held up, the fetches go on up to `ahead` items and no further; once
    /// decodes go, every job ends exactly once, a failed fetch included.
    #[tokio::test]
    async fn fetches_run_ahead_of_held_decodes_and_stay_bounded() {
        let gate = Rc::new(Semaphore::new(0));
        let (fetched, held) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        let held_max = Rc::new(Cell::new(0));
        let jobs: Vec<u64> = (0..20).collect();
        let opened = gate.clone();
        let (watch, watch_held) = (fetched.clone(), held.clone());
        let release = async move {
            // Lets every other task run until nothing moves, then checks what got ahead.
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            let ahead_while_held = watch.get();
            opened.add_permits(1000);
            (ahead_while_held, watch_held.get())
        };
        let mut ended = Vec::new();
        let run = pipeline(
            jobs,
            3,
            2,
            |j| {
                let (fetched, held, held_max) = (fetched.clone(), held.clone(), held_max.clone());
                async move {
                    tokio::task::yield_now().await;
                    fetched.set(fetched.get() + 1);
                    if j == 7 {
                        return (j, Err(format!("fetch {j} failed")));
                    }
                    held.set(held.get() + 1);
                    held_max.set(held_max.get().max(held.get()));
                    (j, Ok(j))
                }
            },
            |item| {
                let (gate, held) = (gate.clone(), held.clone());
                async move {
                    gate.acquire().await.expect("open").forget();
                    held.set(held.get() - 1);
                    Ok::<u64, String>(item * 10)
                }
            },
            |charged, r| ended.push((charged, r)),
        );
        let ((), (ahead_while_held, held_then)) = tokio::join!(run, release);
        // Two decodes waiting and three fetched beyond them: five fetched, all five held.
        assert_eq!((ahead_while_held, held_then), (5, 5));
        assert!(held_max.get() <= 5, "held {} at once", held_max.get());
        ended.sort_by_key(|(c, _)| *c);
        let want: Vec<(u64, Result<u64, String>)> = (0..20)
            .map(|j| {
                let r = if j == 7 {
                    Err(format!("fetch {j} failed"))
                } else {
                    Ok(j * 10)
                };
                (j, r)
            })
            .collect();
        assert_eq!(ended, want);
    }
}
