//! Group commit: writes that arrive together share one transaction and one disk sync.
//!
//! On SQLite every commit waits for the disk (`synchronous = FULL`, see [`crate::db`]) and
//! only one writer runs at a time, so a commit per webhook caps deliveries at the disk's sync
//! rate. A [`GroupCommit`] owns those writes instead: one task takes every job waiting (up to
//! [`MAX_BATCH`]), runs each inside its own savepoint, commits once, and only then tells each
//! caller how its job ended. A caller therefore hears "written" only once its rows are on
//! disk, exactly as with a transaction of its own.
//!
//! A job that fails, or that asks to keep nothing (a duplicate, say), is rolled back to its
//! savepoint and the others go on. If a rollback to a savepoint fails, what the batch holds
//! can no longer be told apart, so the whole transaction is rolled back and every job of the
//! batch fails; a failed commit fails every job too. Nothing is ever half applied: each job's
//! rows are committed whole or not at all, and its caller is told which.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{mpsc, oneshot};

use crate::db::{self, Backend, DbError, Pool};

/// Most jobs in one transaction. Stripe sends a handful of deliveries at a time; the bound
/// keeps one batch's wait short when many arrive at once.
pub const MAX_BATCH: usize = 64;

/// A job's future, borrowing the transaction it writes into.
pub type BoxFuture<'t, T> = Pin<Box<dyn Future<Output = T> + Send + 't>>;

/// An open transaction that jobs write into.
pub type Transaction = sqlx::Transaction<'static, Backend>;

/// How a job ended inside the transaction: its result, and whether its rows are kept.
pub struct Ran<T> {
    pub value: T,
    pub keep: bool,
}

/// One job as the writer task sees it: given the transaction (or `None` when the batch
/// failed before the job's turn), it writes inside its savepoint and hands back how to
/// answer its caller once the batch has ended.
type Job = Box<dyn for<'t> FnOnce(Option<&'t mut Transaction>) -> BoxFuture<'t, Ended> + Send>;

/// Answers a job's caller, given how its batch ended (`Ok` when it was committed).
type Reply = Box<dyn FnOnce(Result<(), &DbError>) + Send>;

struct Ended {
    reply: Reply,
    /// A savepoint could not be ended: what the transaction holds is no longer known.
    poisoned: bool,
}

/// The handle callers submit jobs through; the writer task ends when the last handle goes.
#[derive(Clone)]
pub struct GroupCommit {
    jobs: mpsc::UnboundedSender<Job>,
}

impl GroupCommit {
    /// Starts the writer task on the current runtime, writing through `pool`.
    pub fn start(pool: Pool) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(pool, queue));
        Self { jobs }
    }

    /// Runs `work` in the next batch and returns its value once the batch has ended: `Ok`
    /// only if its rows (when it kept any) were committed. `E` must be able to carry a
    /// database error, since the commit can fail after `work` succeeded.
    pub async fn run<T, E, W>(&self, work: W) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        W: for<'t> FnOnce(&'t mut Transaction) -> BoxFuture<'t, Result<Ran<T>, E>> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel::<Result<T, E>>();
        let job: Job = Box::new(move |transaction| {
            Box::pin(async move {
                let (ran, poisoned) = match transaction {
                    Some(transaction) => {
                        let (ran, poisoned) = in_savepoint(transaction, work).await;
                        (Some(ran), poisoned)
                    }
                    None => (None, false),
                };
                let reply = Box::new(move |batch: Result<(), &DbError>| {
                    let result = match (ran, batch) {
                        (Some(Err(error)), _) => Err(error),
                        (Some(Ok(ran)), Ok(())) => Ok(ran.value),
                        (_, Err(error)) => Err(E::from(error.again())),
                        (None, Ok(())) => Err(E::from(writer_gone())),
                    };
                    let _ = answer.send(result);
                });
                Ended { reply, poisoned }
            })
        });
        self.jobs.send(job).map_err(|_| E::from(writer_gone()))?;
        answered.await.map_err(|_| E::from(writer_gone()))?
    }
}

/// Runs `work` inside a savepoint, then keeps its rows or rolls back to the savepoint.
/// Returns its result and whether the savepoint could not be ended.
async fn in_savepoint<T, E, W>(transaction: &mut Transaction, work: W) -> (Result<Ran<T>, E>, bool)
where
    E: From<DbError>,
    W: for<'t> FnOnce(&'t mut Transaction) -> BoxFuture<'t, Result<Ran<T>, E>>,
{
    if let Err(error) = execute(transaction, "SAVEPOINT job", "open a savepoint").await {
        // Nothing of this job was written; the transaction is as it was.
        return (Err(E::from(error)), false);
    }
    let ran = work(transaction).await;
    let keep = matches!(&ran, Ok(ran) if ran.keep);
    let ended = if keep {
        execute(transaction, "RELEASE SAVEPOINT job", "keep a job").await
    } else {
        match execute(transaction, "ROLLBACK TO SAVEPOINT job", "undo a job").await {
            Ok(()) => execute(transaction, "RELEASE SAVEPOINT job", "close a savepoint").await,
            Err(error) => Err(error),
        }
    };
    match ended {
        Ok(()) => (ran, false),
        Err(error) => (Err(E::from(error)), true),
    }
}

async fn execute(
    transaction: &mut Transaction,
    statement: &'static str,
    operation: &'static str,
) -> Result<(), DbError> {
    sqlx::query(statement)
        .execute(&mut **transaction)
        .await
        .map(|_| ())
        .map_err(db::query_failed(operation))
}

/// The writer task: one batch at a time until every handle is dropped.
async fn write_batches(pool: Pool, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut jobs, MAX_BATCH).await > 0 {
        let mut replies = Vec::with_capacity(jobs.len());
        let ended = match db::begin(&pool, "begin a group of writes").await {
            Ok(mut transaction) => {
                let mut poisoned = false;
                for job in jobs.drain(..) {
                    // Once poisoned, the transaction is abandoned: later jobs do not run.
                    let ended = job((!poisoned).then_some(&mut transaction)).await;
                    poisoned |= ended.poisoned;
                    replies.push(ended.reply);
                }
                if poisoned {
                    drop(transaction);
                    Err(db::query_failed("end a savepoint")(sqlx::Error::Protocol(
                        "the group of writes was rolled back whole".into(),
                    )))
                } else {
                    db::commit(transaction, "commit a group of writes").await
                }
            }
            Err(error) => {
                for job in jobs.drain(..) {
                    replies.push(job(None).await.reply);
                }
                Err(error)
            }
        };
        if let Err(error) = &ended {
            tracing::warn!(%error, jobs = replies.len(), "group of writes not committed");
        }
        for reply in replies {
            reply(ended.as_ref().map(|_| ()));
        }
    }
}

fn writer_gone() -> DbError {
    db::query_failed("hand a write to the writer task")(sqlx::Error::PoolClosed)
}

impl DbError {
    /// The same failure, for another caller: the source error cannot be cloned, so its text
    /// travels instead.
    fn again(&self) -> DbError {
        let text = std::error::Error::source(self)
            .map_or_else(|| self.to_string(), |source| format!("{self}: {source}"));
        db::query_failed("commit a group of writes")(sqlx::Error::Protocol(text))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use sqlx::any::AnyPoolOptions;
    use sqlx::{Connection, Executor};

    use super::*;

    /// A fresh SQLite file with one table, on one connection as the service uses it.
    async fn sqlite_pool() -> (Pool, std::path::PathBuf) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "tollgate-group-commit-{}-{}.db",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(|connection, _| {
                Box::pin(async move {
                    connection.execute("PRAGMA busy_timeout = 100").await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE rows (x INTEGER NOT NULL UNIQUE)")
            .execute(&pool)
            .await
            .unwrap();
        (pool, path)
    }

    /// A job that inserts `x`, then keeps it, drops it, or fails, as `end` says.
    fn insert(
        x: i64,
        end: &'static str,
    ) -> impl for<'t> FnOnce(&'t mut Transaction) -> BoxFuture<'t, Result<Ran<i64>, DbError>> {
        move |transaction| {
            Box::pin(async move {
                sqlx::query("INSERT INTO rows (x) VALUES ($1)")
                    .bind(x)
                    .execute(&mut **transaction)
                    .await
                    .map_err(db::query_failed("insert a row"))?;
                match end {
                    "keep" => Ok(Ran {
                        value: x,
                        keep: true,
                    }),
                    "drop" => Ok(Ran {
                        value: x,
                        keep: false,
                    }),
                    _ => Err(db::query_failed("fail on purpose")(
                        sqlx::Error::RowNotFound,
                    )),
                }
            })
        }
    }

    async fn stored(pool: &Pool) -> Vec<i64> {
        sqlx::query_scalar("SELECT x FROM rows ORDER BY x")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn each_job_keeps_its_rows_whole_or_not_at_all_beside_the_others() {
        let (pool, path) = sqlite_pool().await;
        let grants = GroupCommit::start(pool.clone());
        // Submitted together, so that they share batches; the outcome must not depend on how
        // they are grouped.
        let ends = [
            "keep", "fail", "drop", "keep", "fail", "keep", "drop", "keep",
        ];
        let results = futures::future::join_all(
            ends.iter()
                .enumerate()
                .map(|(x, end)| grants.run(insert(x as i64, end))),
        )
        .await;

        for (x, (end, result)) in ends.iter().zip(&results).enumerate() {
            match *end {
                "fail" => assert!(result.is_err(), "job {x} failed yet reported {result:?}"),
                _ => assert_eq!(result.as_ref().ok(), Some(&(x as i64)), "job {x}"),
            }
        }
        assert_eq!(stored(&pool).await, [0, 3, 5, 7]);
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn a_conflict_with_an_earlier_job_of_the_same_batch_undoes_only_the_later_job() {
        let (pool, path) = sqlite_pool().await;
        let grants = GroupCommit::start(pool.clone());
        let results =
            futures::future::join_all([7, 7, 8].into_iter().map(|x| grants.run(insert(x, "keep"))))
                .await;
        let failed = results.iter().filter(|result| result.is_err()).count();
        assert_eq!(failed, 1, "{results:?}");
        assert_eq!(stored(&pool).await, [7, 8]);
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn a_database_that_cannot_be_written_fails_every_job_and_keeps_nothing() {
        let (pool, path) = sqlite_pool().await;
        let grants = GroupCommit::start(pool.clone());
        // Another connection holds the write lock past the busy timeout: no job can write.
        let url = format!("sqlite://{}", path.display());
        let mut blocker = sqlx::AnyConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut blocker)
            .await
            .unwrap();
        let results =
            futures::future::join_all((20..24).map(|x| grants.run(insert(x, "keep")))).await;
        assert!(results.iter().all(Result::is_err), "{results:?}");
        sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
        assert!(stored(&pool).await.is_empty());
        // The writer goes on with the next batch.
        assert_eq!(grants.run(insert(30, "keep")).await.unwrap(), 30);
        assert_eq!(stored(&pool).await, [30]);
        std::fs::remove_file(&path).ok();
    }
}
