//! A DynamoDB Streams event source mapping, as Lambda runs one with the settings the template
//! gives `tidings-deliver`: starting position `TRIM_HORIZON`, filter criteria, `BatchSize`,
//! `MaximumBatchingWindowInSeconds`, `ParallelizationFactor` 1 (one batch in flight per shard, in
//! order), `FunctionResponseTypes: [ReportBatchItemFailures]`, `MaximumRetryAttempts` and an SQS
//! on-failure destination.
//!
//! Each shard is read with `GetRecords` from a checkpoint. Records the filter rejects are skipped
//! (the checkpoint moves past them); the others are sent to the function in batches. A response
//! listing `batchItemFailures` moves the checkpoint to just before the lowest failed sequence
//! number and the mapping reads again from there (so later records of the batch are sent again
//! too); an invocation error or an invalid response retries the whole batch. After
//! `MaximumRetryAttempts` failed retries of a batch, a failure record describing it goes to the
//! on-failure queue and the mapping goes on after it.
//!
//! Each read takes a fresh shard iterator and is confirmed by a second read 100 ms later: moto
//! briefly shows the items of a cancelled transaction in the stream (see [`StreamMapping::read`]).
//!
//! The stream is read straight from the emulator, not through the meter: Lambda's own polling of a
//! stream is free on AWS. The on-failure records go through the meter, like the SQS mappings'
//! calls.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_dynamodbstreams::error::DisplayErrorContext;
use aws_sdk_dynamodbstreams::types::{AttributeValue, Record, ShardIteratorType};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use super::runtime::{Function, InvokeError, uuid_v4};
use super::sqs::batch_item_failures;

/// How often an idle shard is read (Lambda polls a stream shard about four times a second).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often the shard list is read again (a shard that ends is followed at once).
const SHARD_REFRESH: Duration = Duration::from_secs(10);
/// `GetRecords` returns at most this many records.
const MAX_GET_RECORDS: usize = 1000;
/// A read that returned records is repeated this much later, to confirm them (see
/// [`StreamMapping::read`]).
const CONFIRM_AFTER: Duration = Duration::from_millis(100);
const MAX_UNCONFIRMED_READS: usize = 20;
/// Pause before the n-th retry of a batch: 100 ms, doubling, at most [`MAX_RETRY_BACKOFF`].
const FIRST_RETRY_BACKOFF: Duration = Duration::from_millis(100);
const MAX_RETRY_BACKOFF: Duration = Duration::from_millis(500);

// ---- filter criteria ----

/// The filter pattern `tidings-deliver`'s stream mapping uses in the template: new event items
/// whose fan-out the stream starts (`FAN_OUT_ATTRIBUTE` = `FAN_OUT_BY_STREAM`).
pub fn fan_out_filter() -> FilterPattern {
    use tidings_core::aws::dynamo::{FAN_OUT_ATTRIBUTE, FAN_OUT_BY_STREAM};
    let pattern = json!({
        "eventName": ["INSERT"],
        "dynamodb": {"NewImage": {FAN_OUT_ATTRIBUTE: {"S": [FAN_OUT_BY_STREAM]}}},
    });
    // Built here from constants, so it always parses.
    FilterPattern::from_value(&pattern).unwrap_or(FilterPattern::Fields(BTreeMap::new()))
}

/// A Lambda event filter pattern, in the subset this stand-in understands: nested objects whose
/// leaves are lists of exact values (`{"eventName": ["INSERT"], "dynamodb": {"Keys": …}}`). Every
/// field of the pattern must match; a list matches when the record's value (or, for a list in
/// the record, one of its elements) equals one of its values. Content filters (`prefix`,
/// `anything-but`, `numeric`, `exists`, …) are refused when parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterPattern {
    Fields(BTreeMap<String, FilterPattern>),
    AnyOf(Vec<Value>),
}

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("filter pattern is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("filter pattern at {0:?}: expected an object")]
    NotAnObject(String),
    #[error("filter pattern at {0:?}: expected a list of values or an object")]
    NotAList(String),
    #[error("filter pattern at {0:?}: an empty list matches nothing")]
    Empty(String),
    #[error(
        "filter pattern at {path:?}: {value} is a content filter, which this stand-in does not support (only exact values)"
    )]
    Unsupported { path: String, value: Value },
}

impl FilterPattern {
    /// Parses a pattern as written in `FilterCriteria.Filters[].Pattern`.
    pub fn parse(pattern: &str) -> Result<Self, FilterError> {
        let value: Value = serde_json::from_str(pattern).map_err(FilterError::NotJson)?;
        Self::from_value(&value)
    }

    pub fn from_value(pattern: &Value) -> Result<Self, FilterError> {
        match pattern {
            Value::Object(_) => Self::node(pattern, ""),
            _ => Err(FilterError::NotAnObject(String::new())),
        }
    }

    fn node(value: &Value, path: &str) -> Result<Self, FilterError> {
        match value {
            Value::Object(fields) => fields
                .iter()
                .map(|(name, value)| {
                    let path = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    Ok((name.clone(), Self::node(value, &path)?))
                })
                .collect::<Result<_, _>>()
                .map(Self::Fields),
            Value::Array(values) if values.is_empty() => Err(FilterError::Empty(path.to_owned())),
            Value::Array(values) => {
                if let Some(filter) = values.iter().find(|v| v.is_object() || v.is_array()) {
                    return Err(FilterError::Unsupported {
                        path: path.to_owned(),
                        value: filter.clone(),
                    });
                }
                Ok(Self::AnyOf(values.clone()))
            }
            _ => Err(FilterError::NotAList(path.to_owned())),
        }
    }

    /// Whether `record` (a record as the function receives it) passes.
    pub fn matches(&self, record: &Value) -> bool {
        match self {
            Self::Fields(fields) => fields
                .iter()
                .all(|(name, pattern)| record.get(name).is_some_and(|v| pattern.matches(v))),
            Self::AnyOf(allowed) => match record {
                Value::Array(items) => items.iter().any(|item| allowed.contains(item)),
                value => allowed.contains(value),
            },
        }
    }
}

/// Lambda's rule for several filters: a record passes if any matches (or if there are none).
pub fn passes(filters: &[FilterPattern], record: &Value) -> bool {
    filters.is_empty() || filters.iter().any(|f| f.matches(record))
}

// ---- the event ----

/// An attribute value in DynamoDB JSON (`{"S": "…"}`, `{"N": "1"}`, `{"B": base64}`, …).
pub fn attribute_json(value: &AttributeValue) -> Value {
    match value {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::B(b) => json!({ "B": BASE64.encode(b.as_ref()) }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::Null(n) => json!({ "NULL": n }),
        AttributeValue::Ss(s) => json!({ "SS": s }),
        AttributeValue::Ns(n) => json!({ "NS": n }),
        AttributeValue::Bs(bs) => {
            json!({ "BS": bs.iter().map(|b| BASE64.encode(b.as_ref())).collect::<Vec<_>>() })
        }
        AttributeValue::L(items) => {
            json!({ "L": items.iter().map(attribute_json).collect::<Vec<_>>() })
        }
        AttributeValue::M(map) => json!({ "M": item_json(map) }),
        // A type newer than this SDK: nothing sensible to send.
        _ => Value::Null,
    }
}

fn item_json(item: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        item.iter()
            .map(|(name, value)| (name.clone(), attribute_json(value)))
            .collect(),
    )
}

/// One record of the event Lambda sends for a DynamoDB stream batch.
pub fn record_json(record: &Record, stream_arn: &str, region: &str) -> Value {
    let mut change = Map::new();
    if let Some(d) = &record.dynamodb {
        if let Some(at) = d.approximate_creation_date_time {
            change.insert("ApproximateCreationDateTime".into(), at.secs().into());
        }
        if let Some(keys) = &d.keys {
            change.insert("Keys".into(), item_json(keys));
        }
        if let Some(image) = &d.new_image {
            change.insert("NewImage".into(), item_json(image));
        }
        if let Some(image) = &d.old_image {
            change.insert("OldImage".into(), item_json(image));
        }
        if let Some(seq) = &d.sequence_number {
            change.insert("SequenceNumber".into(), seq.clone().into());
        }
        if let Some(size) = d.size_bytes {
            change.insert("SizeBytes".into(), size.into());
        }
        if let Some(view) = &d.stream_view_type {
            change.insert("StreamViewType".into(), view.as_str().into());
        }
    }
    let mut out = json!({
        "eventID": record.event_id.clone().unwrap_or_default(),
        "eventName": record.event_name.as_ref().map(|n| n.as_str()).unwrap_or_default(),
        // Lambda's events say 1.1 (the emulator's records say 1.0).
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": record.aws_region.as_deref().unwrap_or(region),
        "dynamodb": change,
        "eventSourceARN": stream_arn,
    });
    if let Some(identity) = &record.user_identity {
        // TTL deletions: {"type": "Service", "principalId": "dynamodb.amazonaws.com"}.
        out["userIdentity"] = json!({
            "type": identity.r#type.clone().unwrap_or_default(),
            "principalId": identity.principal_id.clone().unwrap_or_default(),
        });
    }
    out
}

/// Whether `again` begins with `first`'s records (same sequence numbers, same event ids).
fn starts_with_the_same_records(again: &[Record], first: &[Record]) -> bool {
    let id = |r: &Record| {
        (
            r.event_id.clone(),
            r.dynamodb.as_ref().and_then(|d| d.sequence_number.clone()),
        )
    };
    again.len() >= first.len() && first.iter().zip(again).all(|(a, b)| id(a) == id(b))
}

fn sequence_number(record: &Value) -> &str {
    record["dynamodb"]["SequenceNumber"]
        .as_str()
        .unwrap_or_default()
}

/// Orders sequence numbers (decimal strings of up to 40 digits, no leading zeros) numerically.
pub fn compare_sequence_numbers(a: &str, b: &str) -> CmpOrdering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

// ---- checkpoints and retries ----

/// Where reading a shard starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Position {
    TrimHorizon,
    At(String),
    After(String),
}

/// What one invocation of a batch came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every record succeeded (`null`, `{}` or an empty `batchItemFailures`).
    Done,
    /// `batchItemFailures`: the lowest sequence number listed.
    FailedFrom(String),
    /// An invocation error or an invalid response: the whole batch failed.
    WholeBatch,
}

/// What the mapping does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Read on from the new checkpoint.
    Next,
    /// Read the batch again from the checkpoint, after a pause: retry number `retry`.
    Retry { retry: u32 },
    /// Retries are exhausted: the records of the batch from index `from` on are given up after
    /// `invocations` failed invocations, and reading goes on after the batch.
    GiveUp { from: usize, invocations: u32 },
}

/// A shard's checkpoint and the failures of the batch that starts at it.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    position: Position,
    /// Failed invocations in a row of the batch starting at `position`.
    failures: u32,
    /// `MaximumRetryAttempts`; `None` is -1: retry until the record expires (never, here).
    max_retries: Option<u32>,
}

impl Checkpoint {
    pub fn new(max_retries: Option<u32>) -> Self {
        Self {
            position: Position::TrimHorizon,
            failures: 0,
            max_retries,
        }
    }

    pub fn position(&self) -> &Position {
        &self.position
    }

    /// Records read up to `read_to` were all filtered out: skip them.
    pub fn skip_to(&mut self, read_to: Position) {
        self.position = read_to;
    }

    /// Settles an invocation of `batch` (its sequence numbers, in order), whose records were read
    /// up to `read_to` (which can lie past its last record when filtered records followed).
    pub fn settle(&mut self, batch: &[String], read_to: &Position, outcome: &Outcome) -> Decision {
        let from = match outcome {
            Outcome::Done => {
                self.position = read_to.clone();
                self.failures = 0;
                return Decision::Next;
            }
            Outcome::WholeBatch => {
                self.failures += 1;
                0
            }
            Outcome::FailedFrom(seq) => {
                let index = batch.iter().position(|s| s == seq).unwrap_or(0);
                // Records before the failed one are done: a new batch starts at it.
                self.failures = if index == 0 { self.failures + 1 } else { 1 };
                self.position = Position::At(seq.clone());
                index
            }
        };
        let retries = self.failures - 1;
        if self.max_retries.is_some_and(|max| retries >= max) {
            let invocations = self.failures;
            self.position = read_to.clone();
            self.failures = 0;
            Decision::GiveUp { from, invocations }
        } else {
            Decision::Retry {
                retry: self.failures,
            }
        }
    }
}

/// The pause before retry number `retry` (1-based).
pub fn retry_backoff(retry: u32) -> Duration {
    let doublings = retry.saturating_sub(1).min(16);
    (FIRST_RETRY_BACKOFF * 2u32.pow(doublings)).min(MAX_RETRY_BACKOFF)
}

// ---- the on-failure record ----

/// What is known of the last failed invocation of a given-up batch.
#[derive(Debug, Clone)]
pub struct GivenUp<'a> {
    pub records: &'a [Value],
    pub shard_id: &'a str,
    pub stream_arn: &'a str,
    pub function_arn: &'a str,
    pub invocations: u32,
    /// The last invocation ended in an error (crash, timeout, error report), not a response.
    pub function_error: bool,
    pub now: OffsetDateTime,
}

/// The record Lambda sends to a stream mapping's on-failure destination (SQS message body).
pub fn failure_record(given_up: &GivenUp<'_>) -> Value {
    let arrival = |record: Option<&Value>| {
        record
            .and_then(|r| r["dynamodb"]["ApproximateCreationDateTime"].as_i64())
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .and_then(|t| t.format(&Rfc3339).ok())
    };
    let mut response = json!({"statusCode": 200, "executedVersion": "$LATEST"});
    if given_up.function_error {
        response["functionError"] = "Unhandled".into();
    }
    let millis = given_up
        .now
        .replace_nanosecond(given_up.now.millisecond() as u32 * 1_000_000);
    json!({
        "requestContext": {
            "requestId": uuid_v4(),
            "functionArn": given_up.function_arn,
            "condition": "RetryAttemptsExhausted",
            "approximateInvokeCount": given_up.invocations,
        },
        "responseContext": response,
        "version": "1.0",
        "timestamp": millis.ok().and_then(|t| t.format(&Rfc3339).ok()),
        "DDBStreamBatchInfo": {
            "shardId": given_up.shard_id,
            "startSequenceNumber": given_up.records.first().map(sequence_number),
            "endSequenceNumber": given_up.records.last().map(sequence_number),
            "approximateArrivalOfFirstRecord": arrival(given_up.records.first()),
            "approximateArrivalOfLastRecord": arrival(given_up.records.last()),
            "batchSize": given_up.records.len(),
            "streamArn": given_up.stream_arn,
        },
    })
}

// ---- the mapping ----

/// Counters shown by the admin endpoint.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub shards: AtomicU64,
    pub batches: AtomicU64,
    /// Records sent to the function (a record sent again counts again).
    pub records: AtomicU64,
    /// Records the filter criteria skipped (each once).
    pub filtered: AtomicU64,
    /// Invocations that were retries of a failed batch.
    pub retried: AtomicU64,
    /// Batches given up after their retries (one on-failure record each).
    pub gave_up: AtomicU64,
    pub invoke_errors: AtomicU64,
    /// Reads whose records were gone when read again (moto's cancelled transactions).
    pub discarded_reads: AtomicU64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamSnapshot {
    pub stream_arn: String,
    pub function: String,
    pub on_failure_queue_url: String,
    pub shards: u64,
    pub batches: u64,
    pub records: u64,
    pub filtered: u64,
    pub retried: u64,
    pub gave_up: u64,
    pub invoke_errors: u64,
    pub discarded_reads: u64,
}

/// One stream → function mapping.
pub struct StreamMapping {
    /// Reads the stream (straight from the emulator).
    pub client: aws_sdk_dynamodbstreams::Client,
    /// Sends on-failure records (through the meter).
    pub sqs: aws_sdk_sqs::Client,
    pub stream_arn: String,
    pub region: String,
    pub on_failure_queue_url: String,
    pub batch_size: usize,
    pub batching_window: Duration,
    /// `MaximumRetryAttempts` (`None`: -1, unlimited).
    pub max_retries: Option<u32>,
    pub filters: Vec<FilterPattern>,
    pub function: Arc<Function>,
    /// Shared with the SQS mappings of the function: at most this many batches in flight.
    pub concurrency: Arc<Semaphore>,
    pub stats: Arc<StreamStats>,
}

/// What one read of a shard returned.
struct Read {
    records: Vec<Record>,
    /// The shard is closed and read to its end.
    ended: bool,
}

impl StreamMapping {
    pub fn snapshot(&self) -> StreamSnapshot {
        let s = &self.stats;
        StreamSnapshot {
            stream_arn: self.stream_arn.clone(),
            function: self.function.name().to_owned(),
            on_failure_queue_url: self.on_failure_queue_url.clone(),
            shards: s.shards.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            records: s.records.load(Ordering::Relaxed),
            filtered: s.filtered.load(Ordering::Relaxed),
            retried: s.retried.load(Ordering::Relaxed),
            gave_up: s.gave_up.load(Ordering::Relaxed),
            invoke_errors: s.invoke_errors.load(Ordering::Relaxed),
            discarded_reads: s.discarded_reads.load(Ordering::Relaxed),
        }
    }

    /// Follows the stream's shards until `shutdown` turns true: one task per shard, a child shard
    /// once its parent is read to its end.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut started = HashSet::new();
        let mut ended = HashSet::new();
        let mut tasks = JoinSet::new();
        let mut failing = false;
        loop {
            match self.shards().await {
                Ok(shards) => {
                    failing = false;
                    let listed: HashSet<&str> = shards.iter().map(|(id, _)| id.as_str()).collect();
                    for (id, parent) in &shards {
                        let waits_for_parent = parent.as_deref().is_some_and(|p| {
                            listed.contains(p) && !ended.contains(p) && p != id.as_str()
                        });
                        if started.contains(id) || waits_for_parent {
                            continue;
                        }
                        started.insert(id.clone());
                        self.stats.shards.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(stream = %self.stream_arn, shard = %id, "reading shard");
                        let this = Arc::clone(&self);
                        let (id, stop) = (id.clone(), shutdown.clone());
                        tasks.spawn(async move {
                            this.run_shard(&id, stop).await;
                            id
                        });
                    }
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(stream = %self.stream_arn, error = format!("{error:#}"), "DescribeStream failed; retrying");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(if failing { Duration::from_secs(1) } else { SHARD_REFRESH }) => {}
                Some(done) = tasks.join_next() => {
                    if let Ok(id) = done {
                        ended.insert(id);
                    }
                }
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Every shard of the stream with its parent.
    async fn shards(&self) -> anyhow::Result<Vec<(String, Option<String>)>> {
        let mut shards = Vec::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{}", DisplayErrorContext(&e)))?;
            let description = out.stream_description.context("no StreamDescription")?;
            for shard in description.shards.unwrap_or_default() {
                if let Some(id) = shard.shard_id {
                    shards.push((id, shard.parent_shard_id));
                }
            }
            match description.last_evaluated_shard_id {
                Some(last) => start = Some(last),
                None => return Ok(shards),
            }
        }
    }

    /// Reads up to `limit` records of a shard from `position`, and believes a non-empty answer
    /// only once a second read, [`CONFIRM_AFTER`] later, starts with the same records.
    ///
    /// moto rolls a cancelled `TransactWriteItems` back by swapping in a copy of the table taken
    /// before it, stream included. Until the swap, the transaction's items are in the stream; a
    /// read then (or through an iterator taken before the swap) returns them, and the next real
    /// write reuses their sequence numbers. A read some time later, from a fresh iterator, sees
    /// the live stream only.
    async fn read(
        &self,
        shard_id: &str,
        position: &Position,
        limit: usize,
    ) -> anyhow::Result<Read> {
        let mut read = self.read_once(shard_id, position, limit).await?;
        for _ in 0..MAX_UNCONFIRMED_READS {
            if read.records.is_empty() {
                return Ok(read);
            }
            tokio::time::sleep(CONFIRM_AFTER).await;
            let again = self.read_once(shard_id, position, limit).await?;
            if starts_with_the_same_records(&again.records, &read.records) {
                return Ok(read);
            }
            self.stats.discarded_reads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(stream = %self.stream_arn, shard = %shard_id, "records read from the stream were gone when read again (the emulator's cancelled transaction): reading again");
            read = again;
        }
        anyhow::bail!("the stream changed under {MAX_UNCONFIRMED_READS} reads in a row")
    }

    /// One read, from a fresh iterator: one taken before a cancelled transaction would follow the
    /// emulator's discarded copy of the stream for ever (see [`StreamMapping::read`]).
    async fn read_once(
        &self,
        shard_id: &str,
        position: &Position,
        limit: usize,
    ) -> anyhow::Result<Read> {
        let (kind, seq) = match position {
            Position::TrimHorizon => (ShardIteratorType::TrimHorizon, None),
            Position::At(seq) => (ShardIteratorType::AtSequenceNumber, Some(seq.clone())),
            Position::After(seq) => (ShardIteratorType::AfterSequenceNumber, Some(seq.clone())),
        };
        let iterator = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(shard_id)
            .shard_iterator_type(kind)
            .set_sequence_number(seq)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("GetShardIterator: {}", DisplayErrorContext(&e)))?;
        let Some(iterator) = iterator.shard_iterator else {
            return Ok(Read {
                records: Vec::new(),
                ended: true,
            });
        };
        let out = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(i32::try_from(limit.clamp(1, MAX_GET_RECORDS)).unwrap_or(1))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("GetRecords: {}", DisplayErrorContext(&e)))?;
        let records = out.records.unwrap_or_default();
        Ok(Read {
            ended: out.next_shard_iterator.is_none() && records.is_empty(),
            records,
        })
    }

    /// One shard, batch after batch, until it ends or `shutdown` turns true.
    async fn run_shard(&self, shard_id: &str, mut shutdown: watch::Receiver<bool>) {
        let mut checkpoint = Checkpoint::new(self.max_retries);
        // The highest sequence number counted in `filtered` (records are read again on retries).
        let mut counted = String::new();
        let mut failing = false;
        loop {
            // 1. Gather a batch: up to `batch_size` records that pass the filters, read from the
            //    checkpoint, and no longer than the batching window after the first of them.
            let mut batch: Vec<Value> = Vec::new();
            let mut read_to = checkpoint.position().clone();
            let mut first_at: Option<Instant> = None;
            loop {
                let wanted = self.batch_size - batch.len();
                let read = tokio::select! {
                    read = self.read(shard_id, &read_to, wanted) => read,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                };
                let read = match read {
                    Ok(read) => {
                        if failing {
                            tracing::info!(stream = %self.stream_arn, shard = %shard_id, "reading again");
                            failing = false;
                        }
                        read
                    }
                    Err(error) => {
                        if !failing {
                            tracing::warn!(stream = %self.stream_arn, shard = %shard_id, error = format!("{error:#}"), "reading the stream failed; retrying every second");
                            failing = true;
                        }
                        if !sleep_unless_stopped(Duration::from_secs(1), &mut shutdown).await {
                            return;
                        }
                        continue;
                    }
                };
                let got_records = !read.records.is_empty();
                for record in &read.records {
                    let json = record_json(record, &self.stream_arn, &self.region);
                    let seq = sequence_number(&json).to_owned();
                    if passes(&self.filters, &json) {
                        batch.push(json);
                    } else if compare_sequence_numbers(&seq, &counted).is_gt() {
                        self.stats.filtered.fetch_add(1, Ordering::Relaxed);
                        counted.clone_from(&seq);
                    }
                    read_to = Position::After(seq);
                }
                if batch.is_empty() {
                    checkpoint.skip_to(read_to.clone());
                    if read.ended {
                        tracing::info!(stream = %self.stream_arn, shard = %shard_id, "shard read to its end");
                        return;
                    }
                    if !got_records && !sleep_unless_stopped(POLL_INTERVAL, &mut shutdown).await {
                        return;
                    }
                    continue;
                }
                let first = *first_at.get_or_insert_with(Instant::now);
                let waited = first.elapsed();
                if batch.len() >= self.batch_size || waited >= self.batching_window || read.ended {
                    break;
                }
                if !got_records {
                    let pause = POLL_INTERVAL.min(self.batching_window - waited);
                    if !sleep_unless_stopped(pause, &mut shutdown).await {
                        return;
                    }
                }
            }

            // 2. Invoke, and settle.
            let Some((outcome, function_error)) = self.invoke(&batch, &mut shutdown).await else {
                return;
            };
            let seqs: Vec<String> = batch
                .iter()
                .map(|r| sequence_number(r).to_owned())
                .collect();
            match checkpoint.settle(&seqs, &read_to, &outcome) {
                Decision::Next => {}
                Decision::Retry { retry } => {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    if !sleep_unless_stopped(retry_backoff(retry), &mut shutdown).await {
                        return;
                    }
                }
                Decision::GiveUp { from, invocations } => {
                    self.give_up(&GivenUp {
                        records: &batch[from..],
                        shard_id,
                        stream_arn: &self.stream_arn,
                        function_arn: self.function.arn(),
                        invocations,
                        function_error,
                        now: OffsetDateTime::now_utc(),
                    })
                    .await;
                }
            }
        }
    }

    /// Invokes the function with one batch: the outcome, and whether it was an invocation error.
    /// `None` when shutting down.
    async fn invoke(
        &self,
        batch: &[Value],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(Outcome, bool)> {
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats
            .records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let event = json!({ "Records": batch });
        let ids: HashSet<String> = batch
            .iter()
            .map(|r| sequence_number(r).to_owned())
            .collect();
        let permit = tokio::select! {
            permit = Arc::clone(&self.concurrency).acquire_owned() => permit.ok()?,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        // Generous: the batch waits for a free environment, then runs up to the function timeout.
        let give_up_after = self.function.timeout() * 2 + Duration::from_secs(5);
        let result = tokio::select! {
            result = self.function.invoke(serde_json::to_vec(&event).unwrap_or_default(), give_up_after) => result,
            _ = shutdown.wait_for(|stop| *stop) => return None,
        };
        drop(permit);
        let outcome = match result {
            Ok(response) => match batch_item_failures(&response, &ids) {
                Ok(failed) => match failed.iter().min_by(|a, b| compare_sequence_numbers(a, b)) {
                    None => (Outcome::Done, false),
                    Some(lowest) => (Outcome::FailedFrom(lowest.clone()), false),
                },
                Err(reason) => {
                    tracing::warn!(stream = %self.stream_arn, %reason, "invalid batch response: the whole batch is retried");
                    (Outcome::WholeBatch, false)
                }
            },
            Err(InvokeError::ShuttingDown) => return None,
            Err(error) => {
                tracing::warn!(stream = %self.stream_arn, %error, records = batch.len(), "invocation failed: the whole batch is retried");
                self.stats.invoke_errors.fetch_add(1, Ordering::Relaxed);
                (Outcome::WholeBatch, true)
            }
        };
        Some(outcome)
    }

    /// Sends the on-failure record of a given-up batch (three tries) and logs it.
    async fn give_up(&self, given_up: &GivenUp<'_>) {
        self.stats.gave_up.fetch_add(1, Ordering::Relaxed);
        let record = failure_record(given_up);
        let info = &record["DDBStreamBatchInfo"];
        tracing::warn!(
            stream = %self.stream_arn,
            shard = %given_up.shard_id,
            start = info["startSequenceNumber"].as_str().unwrap_or_default(),
            end = info["endSequenceNumber"].as_str().unwrap_or_default(),
            records = given_up.records.len(),
            invocations = given_up.invocations,
            queue = %self.on_failure_queue_url,
            "retries exhausted: batch given up, failure record sent to the on-failure queue"
        );
        let body = record.to_string();
        for attempt in 1..=3 {
            match self
                .sqs
                .send_message()
                .queue_url(&self.on_failure_queue_url)
                .message_body(&body)
                .send()
                .await
            {
                Ok(_) => return,
                Err(error) if attempt == 3 => {
                    tracing::error!(queue = %self.on_failure_queue_url, error = %aws_sdk_sqs::error::DisplayErrorContext(&error), %body, "the on-failure record could not be sent: it is only in this log");
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// Sleeps; `false` if `shutdown` turned true first.
async fn sleep_unless_stopped(pause: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        _ = shutdown.wait_for(|stop| *stop) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodbstreams::primitives::{Blob, DateTime};
    use aws_sdk_dynamodbstreams::types::{OperationType, StreamRecord, StreamViewType};

    /// Exactly what infra/template.yaml puts in the mapping's `FilterCriteria`.
    const TEMPLATE_PATTERN: &str =
        r#"{"eventName":["INSERT"],"dynamodb":{"NewImage":{"fan_out":{"S":["stream"]}}}}"#;
    const ARN: &str =
        "arn:aws:dynamodb:us-east-1:123456789012:table/t-table/stream/2026-11-29T18:09:24.054";

    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.to_owned())
    }

    fn record(name: OperationType, seq: &str, image: &[(&str, AttributeValue)]) -> Record {
        let image: HashMap<String, AttributeValue> = image
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        Record::builder()
            .event_id(format!("id-{seq}"))
            .event_name(name)
            .event_version("1.0")
            .event_source("aws:dynamodb")
            .aws_region("us-east-1")
            .dynamodb(
                StreamRecord::builder()
                    .approximate_creation_date_time(DateTime::from_secs(1_764_061_200))
                    .keys("pk", image.get("pk").cloned().unwrap_or_else(|| s("k")))
                    .set_new_image(Some(image))
                    .sequence_number(seq)
                    .size_bytes(42)
                    .stream_view_type(StreamViewType::NewImage)
                    .build(),
            )
            .build()
    }

    fn event_item(seq: &str, fan_out: Option<&str>) -> Record {
        let mut image = vec![("pk", s(&format!("T#t#EVT#{seq}")))];
        if let Some(f) = fan_out {
            image.push(("fan_out", s(f)));
        }
        record(OperationType::Insert, seq, &image)
    }

    #[test]
    fn the_templates_filter_lets_only_new_stream_fanned_events_through() {
        let pattern = FilterPattern::parse(TEMPLATE_PATTERN).unwrap();
        assert_eq!(pattern, fan_out_filter(), "built from the constants");
        let json = |r: &Record| record_json(r, ARN, "us-east-1");
        assert!(pattern.matches(&json(&event_item("1", Some("stream")))));
        assert!(!pattern.matches(&json(&event_item("2", None))));
        assert!(!pattern.matches(&json(&event_item("3", Some("queue")))));
        let modify = record(
            OperationType::Modify,
            "4",
            &[("pk", s("T#t#EVT#4")), ("fan_out", s("stream"))],
        );
        assert!(!pattern.matches(&json(&modify)));
        let remove = Record::builder()
            .event_name(OperationType::Remove)
            .dynamodb(
                StreamRecord::builder()
                    .keys("pk", s("x"))
                    .sequence_number("5")
                    .build(),
            )
            .build();
        assert!(!pattern.matches(&json(&remove)));
        // A number is not a string: {"N": "1"} does not match {"S": [...]}.
        let number = record(
            OperationType::Insert,
            "6",
            &[("fan_out", AttributeValue::N("1".into()))],
        );
        assert!(!pattern.matches(&json(&number)));
    }

    #[test]
    fn filter_patterns_follow_lambdas_rules_for_the_subset() {
        let p = FilterPattern::parse(r#"{"a":["x","y"],"b":{"c":[1, null]}}"#).unwrap();
        assert!(p.matches(&json!({"a": "y", "b": {"c": 1}, "extra": true})));
        assert!(
            p.matches(&json!({"a": ["z", "x"], "b": {"c": null}})),
            "a list in the record: any element"
        );
        assert!(
            !p.matches(&json!({"a": "y", "b": {}})),
            "a missing field fails"
        );
        assert!(!p.matches(&json!({"a": "y"})));
        assert!(!p.matches(&json!({"a": "z", "b": {"c": 1}})));
        assert!(
            !p.matches(&json!({"a": "y", "b": {"c": "1"}})),
            "exact types"
        );
        assert!(passes(&[], &json!({})), "no filters: everything passes");
        assert!(passes(
            &[p.clone(), fan_out_filter()],
            &json!({"a": "x", "b": {"c": 1}})
        ));

        for bad in [
            "not json",
            r#"["INSERT"]"#,
            r#"{"eventName":"INSERT"}"#,
            r#"{"eventName":[]}"#,
            r#"{"eventName":[{"prefix":"INS"}]}"#,
            r#"{"dynamodb":{"NewImage":{"fan_out":{"S":[{"exists":true}]}}}}"#,
        ] {
            assert!(FilterPattern::parse(bad).is_err(), "{bad}");
        }
        let error = FilterPattern::parse(r#"{"dynamodb":{"Keys":[{"anything-but":"x"}]}}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("dynamodb.Keys"), "{error}");
    }

    #[test]
    fn records_become_the_dynamodb_stream_event_lambda_sends() {
        use aws_lambda_events::event::dynamodb::Event;
        let nested = AttributeValue::M(
            [
                ("n".to_owned(), AttributeValue::N("1.5".into())),
                ("b".to_owned(), AttributeValue::B(Blob::new(vec![1, 2, 3]))),
                (
                    "l".to_owned(),
                    AttributeValue::L(vec![AttributeValue::Bool(true), AttributeValue::Null(true)]),
                ),
                (
                    "ss".to_owned(),
                    AttributeValue::Ss(vec!["a".into(), "b".into()]),
                ),
            ]
            .into(),
        );
        let r = record(
            OperationType::Insert,
            "1100000000017454423009",
            &[
                ("pk", s("T#t#EVT#1")),
                ("fan_out", s("stream")),
                ("event", nested),
            ],
        );
        let json = record_json(&r, ARN, "eu-west-1");
        assert_eq!(json["eventID"], "id-1100000000017454423009");
        assert_eq!(json["eventName"], "INSERT");
        assert_eq!(json["eventVersion"], "1.1");
        assert_eq!(json["eventSource"], "aws:dynamodb");
        assert_eq!(json["awsRegion"], "us-east-1", "the record's own region");
        assert_eq!(json["eventSourceARN"], ARN);
        let d = &json["dynamodb"];
        assert_eq!(d["ApproximateCreationDateTime"], 1_764_061_200);
        assert_eq!(d["Keys"], json!({"pk": {"S": "T#t#EVT#1"}}));
        assert_eq!(d["SequenceNumber"], "1100000000017454423009");
        assert_eq!(d["SizeBytes"], 42);
        assert_eq!(d["StreamViewType"], "NEW_IMAGE");
        assert!(d.get("OldImage").is_none());
        assert_eq!(
            d["NewImage"]["event"],
            json!({"M": {"n": {"N": "1.5"}, "b": {"B": "AQID"}, "l": {"L": [{"BOOL": true}, {"NULL": true}]}, "ss": {"SS": ["a", "b"]}}})
        );

        // What the deliver function deserializes.
        let event: Event = serde_json::from_value(json!({ "Records": [json] })).unwrap();
        let parsed = &event.records[0];
        assert_eq!(parsed.event_name, "INSERT");
        assert_eq!(parsed.event_source_arn.as_deref(), Some(ARN));
        assert_eq!(
            parsed.change.sequence_number.as_deref(),
            Some("1100000000017454423009")
        );
        assert_eq!(
            parsed.change.approximate_creation_date_time.timestamp(),
            1_764_061_200
        );
        assert_eq!(parsed.change.size_bytes, 42);
        assert!(parsed.change.new_image.get("fan_out").is_some());
    }

    #[test]
    fn a_read_is_confirmed_by_one_starting_with_the_same_records() {
        let a = event_item("11", Some("stream"));
        let b = event_item("12", None);
        let c = event_item("13", Some("stream"));
        let mut phantom = event_item("12", None);
        phantom.event_id = Some("another".into());
        let same = |again: &[Record], first: &[Record]| starts_with_the_same_records(again, first);
        assert!(same(&[a.clone(), b.clone()], &[a.clone(), b.clone()]));
        assert!(
            same(&[a.clone(), b.clone(), c.clone()], &[a.clone(), b.clone()]),
            "more written since"
        );
        assert!(
            !same(std::slice::from_ref(&a), &[a.clone(), b.clone()]),
            "gone"
        );
        assert!(
            !same(&[a.clone(), phantom], &[a.clone(), b.clone()]),
            "its sequence number reused"
        );
        assert!(same(&[], &[]));
    }

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        assert!(compare_sequence_numbers("900", "1000").is_lt());
        assert!(
            compare_sequence_numbers("1100000000017454423010", "1100000000017454423009").is_gt()
        );
        assert!(compare_sequence_numbers("5", "5").is_eq());
        assert!(
            compare_sequence_numbers("1", "").is_gt(),
            "anything is past nothing"
        );
    }

    fn seqs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_done_batch_moves_the_checkpoint_past_what_was_read() {
        let mut c = Checkpoint::new(Some(10));
        let read_to = Position::After("15".into());
        assert_eq!(
            c.settle(&seqs(&["11", "12"]), &read_to, &Outcome::Done),
            Decision::Next
        );
        assert_eq!(
            c.position(),
            &read_to,
            "filtered records after the batch are skipped too"
        );
        c.skip_to(Position::After("20".into()));
        assert_eq!(c.position(), &Position::After("20".into()));
    }

    #[test]
    fn a_reported_failure_retries_from_the_lowest_failed_record() {
        let mut c = Checkpoint::new(Some(2));
        let batch = seqs(&["11", "12", "13"]);
        let read_to = Position::After("13".into());
        let failed = Outcome::FailedFrom("12".into());
        assert_eq!(
            c.settle(&batch, &read_to, &failed),
            Decision::Retry { retry: 1 }
        );
        assert_eq!(
            c.position(),
            &Position::At("12".into()),
            "11 is done, 12 and 13 come again"
        );
        // The retried batch starts at 12 and fails at 12 again: retries count up.
        let batch = seqs(&["12", "13"]);
        assert_eq!(
            c.settle(&batch, &read_to, &failed),
            Decision::Retry { retry: 2 }
        );
        assert_eq!(
            c.settle(&batch, &read_to, &failed),
            Decision::GiveUp {
                from: 0,
                invocations: 3
            },
            "MaximumRetryAttempts 2: three invocations, then given up"
        );
        assert_eq!(
            c.position(),
            &read_to,
            "reading goes on after the given-up batch"
        );
        // Progress resets the count: a later record failing starts afresh.
        let batch = seqs(&["14", "15"]);
        let read_to = Position::After("15".into());
        assert_eq!(
            c.settle(&batch, &read_to, &Outcome::FailedFrom("14".into())),
            Decision::Retry { retry: 1 }
        );
        assert_eq!(
            c.settle(&batch, &read_to, &Outcome::FailedFrom("15".into())),
            Decision::Retry { retry: 1 }
        );
        assert_eq!(c.position(), &Position::At("15".into()));
    }

    #[test]
    fn a_failed_invocation_retries_the_whole_batch_until_retries_run_out() {
        let mut c = Checkpoint::new(Some(1));
        c.skip_to(Position::After("10".into()));
        let batch = seqs(&["11", "12"]);
        let read_to = Position::After("12".into());
        assert_eq!(
            c.settle(&batch, &read_to, &Outcome::WholeBatch),
            Decision::Retry { retry: 1 }
        );
        assert_eq!(
            c.position(),
            &Position::After("10".into()),
            "the checkpoint stays"
        );
        assert_eq!(
            c.settle(&batch, &read_to, &Outcome::WholeBatch),
            Decision::GiveUp {
                from: 0,
                invocations: 2
            }
        );
        // No retries at all: a mid-batch failure gives up the records from it on.
        let mut c = Checkpoint::new(Some(0));
        assert_eq!(
            c.settle(&batch, &read_to, &Outcome::FailedFrom("12".into())),
            Decision::GiveUp {
                from: 1,
                invocations: 1
            }
        );
        // -1: never given up.
        let mut c = Checkpoint::new(None);
        for retry in 1..=50 {
            assert_eq!(
                c.settle(&batch, &read_to, &Outcome::WholeBatch),
                Decision::Retry { retry }
            );
        }
    }

    #[test]
    fn retries_back_off_briefly() {
        assert_eq!(retry_backoff(1), Duration::from_millis(100));
        assert_eq!(retry_backoff(2), Duration::from_millis(200));
        assert_eq!(retry_backoff(3), Duration::from_millis(400));
        assert_eq!(retry_backoff(4), MAX_RETRY_BACKOFF);
        assert_eq!(retry_backoff(u32::MAX), MAX_RETRY_BACKOFF);
        assert_eq!(retry_backoff(0), FIRST_RETRY_BACKOFF);
    }

    #[test]
    fn the_failure_record_has_lambdas_shape() {
        let records = [
            record_json(
                &event_item("1100000000017454423012", Some("stream")),
                ARN,
                "us-east-1",
            ),
            record_json(
                &event_item("1100000000017454423013", Some("stream")),
                ARN,
                "us-east-1",
            ),
        ];
        let now = OffsetDateTime::from_unix_timestamp_nanos(1_764_061_262_717_123_456).unwrap();
        let record = failure_record(&GivenUp {
            records: &records,
            shard_id: "shardId-1",
            stream_arn: ARN,
            function_arn: "arn:aws:lambda:us-east-1:123456789012:function:tidings-deliver",
            invocations: 11,
            function_error: true,
            now,
        });
        let context = &record["requestContext"];
        assert_eq!(context["requestId"].as_str().unwrap().len(), 36);
        assert_eq!(
            context["functionArn"],
            "arn:aws:lambda:us-east-1:123456789012:function:tidings-deliver"
        );
        assert_eq!(context["condition"], "RetryAttemptsExhausted");
        assert_eq!(context["approximateInvokeCount"], 11);
        assert_eq!(
            record["responseContext"],
            json!({"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"})
        );
        assert_eq!(record["version"], "1.0");
        assert_eq!(record["timestamp"], "2025-11-25T09:01:02.717Z");
        assert_eq!(
            record["DDBStreamBatchInfo"],
            json!({
                "shardId": "shardId-1",
                "startSequenceNumber": "1100000000017454423012",
                "endSequenceNumber": "1100000000017454423013",
                "approximateArrivalOfFirstRecord": "2025-11-25T09:00:00Z",
                "approximateArrivalOfLastRecord": "2025-11-25T09:00:00Z",
                "batchSize": 2,
                "streamArn": ARN,
            })
        );
        let partial = failure_record(&GivenUp {
            function_error: false,
            ..GivenUp {
                records: &records[1..],
                shard_id: "shardId-1",
                stream_arn: ARN,
                function_arn: "f",
                invocations: 1,
                function_error: true,
                now,
            }
        });
        assert!(partial["responseContext"].get("functionError").is_none());
        assert_eq!(partial["DDBStreamBatchInfo"]["batchSize"], 1);
    }
}
