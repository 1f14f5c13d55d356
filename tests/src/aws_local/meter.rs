//! The meter: a proxy between the functions and the emulator that counts every DynamoDB and SQS
//! request, and the capacity units DynamoDB would bill for each.
//!
//! Each caller (a function, or the event source mappings) gets its own listener, so its
//! `AWS_ENDPOINT_URL` names who is calling. Requests and answers pass through unchanged; the
//! meter reads both. Moto answers every request with a flat `ConsumedCapacity`, so the units are
//! computed here from the items on the wire with DynamoDB's published rules:
//!
//! - item size: the UTF-8 length of every attribute name plus its value (string: UTF-8 bytes;
//!   number: 1 byte per 2 significant digits + 1; binary: bytes; boolean and null: 1; list and
//!   map: 3 bytes + 1 per element + the elements).
//! - reads: ⌈size / 4 KB⌉ read units, at least 1, half for an eventually consistent read; a
//!   `Query` rounds the sum of the items it returns; `BatchGetItem` rounds each item.
//! - writes: ⌈size / 1 KB⌉ write units, at least 1, of the larger of the item before and after;
//!   inside `TransactWriteItems` twice that (prepare + commit). A write whose condition fails
//!   still costs its units.
//! - index writes (counted apart): per global secondary index, the item's projection
//!   (table key + index key + projected attributes) written when it enters the index or a
//!   projected attribute changes, deleted when it leaves, and both when an index key changes.
//!   Index writes are not doubled by a transaction (they propagate after it commits).
//!
//! To know the item before a write, the meter reads it from the emulator first (and after an
//! `UpdateItem`, the item it left); those reads are the meter's own and are not counted.
//!
//! It is also where the stand-in is made as hostile as AWS ([`Faults`]): it can let a write
//! commit and then lose its answer (the caller gets a 500 and its SDK retries the write), and it
//! can hold new items back from global secondary index queries for a while (DynamoDB's indexes
//! are eventually consistent; the emulator's are not).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Caller name of the SQS event source mappings (the stand-in's own polling).
pub const EVENT_SOURCE_MAPPING: &str = "event-source-mapping";

const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
const DYNAMODB_PREFIX: &str = "DynamoDB_20120810.";
const SQS_PREFIX: &str = "AmazonSQS.";

/// What one operation cost one caller, summed over its calls.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OpUsage {
    pub calls: u64,
    /// Calls the emulator answered with an error (a failed condition included).
    pub errors: u64,
    /// DynamoDB write request units on the table.
    pub write_units: f64,
    /// DynamoDB write request units on global secondary indexes.
    pub index_write_units: f64,
    /// DynamoDB read request units.
    pub read_units: f64,
    /// SQS messages sent, received or deleted.
    pub messages: u64,
    /// `ReceiveMessage` calls that returned no message.
    pub empty_receives: u64,
}

impl OpUsage {
    fn add(&mut self, other: &OpUsage) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.write_units += other.write_units;
        self.index_write_units += other.index_write_units;
        self.read_units += other.read_units;
        self.messages += other.messages;
        self.empty_receives += other.empty_receives;
    }
}

/// Usage by caller, then by operation (`dynamodb.PutItem`, `sqs.SendMessageBatch`, …).
pub type Usage = BTreeMap<String, BTreeMap<String, OpUsage>>;

/// Sums every operation of a service (`"dynamodb"` or `"sqs"`) over the given callers.
pub fn service_total(usage: &Usage, service: &str, callers: &[&str]) -> OpUsage {
    let prefix = format!("{service}.");
    let mut total = OpUsage::default();
    for (caller, ops) in usage {
        if !callers.contains(&caller.as_str()) {
            continue;
        }
        for (op, u) in ops {
            if op.starts_with(&prefix) {
                total.add(u);
            }
        }
    }
    total
}

pub struct Meter {
    upstream: String,
    http: reqwest::Client,
    tables: Mutex<HashMap<String, Arc<TableSchema>>>,
    usage: Mutex<Usage>,
    faults: Mutex<Faults>,
    /// Requests per partition key since start, by `caller operation on` (the table, or an
    /// index): what the busiest partition of each access takes.
    partitions: Mutex<BTreeMap<String, HashMap<String, u64>>>,
}

/// How one kind of access spreads over partitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionShare {
    /// Partition-key accesses (an item read or written, an index row written, a query).
    pub requests: u64,
    pub distinct_keys: u64,
    /// The busiest key's part of the requests, 0 to 1.
    pub busiest_share: f64,
    /// The busiest key with ids replaced by their kind (`T#{tenant}#SUBS`), so it reads as a shape.
    pub busiest_key: String,
}

/// A write that commits and whose answer is lost: the next `times` requests of `caller` (any
/// caller when empty) for `operation` (`PutItem`, `TransactWriteItems`, …) whose body contains
/// `contains` reach the emulator, and the caller gets a 500 `InternalServerError` instead of the
/// answer, as when a connection drops after DynamoDB committed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LostAnswer {
    #[serde(default)]
    pub caller: String,
    pub operation: String,
    #[serde(default)]
    pub contains: String,
    pub times: u32,
}

/// The faults the meter injects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Faults {
    #[serde(default)]
    pub lost_answers: Vec<LostAnswer>,
    /// How long an item written anew stays out of global secondary index queries.
    #[serde(default, with = "humantime_millis")]
    pub index_lag: std::time::Duration,
    /// Answers lost so far (a counter, for the tests).
    #[serde(default)]
    pub answers_lost: u64,
    /// Index rows held back from a query so far.
    #[serde(default)]
    pub index_rows_held_back: u64,
    /// When each item created within the lag was written, by table and `pk` (JSON of the key).
    #[serde(skip)]
    new_items: HashMap<(String, String), std::time::Instant>,
}

/// The index lag as whole milliseconds on the wire (`"indexLagMs"` reads better, but one field).
mod humantime_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl Meter {
    /// A meter in front of the emulator at `upstream` (e.g. `http://127.0.0.1:5555`).
    pub fn new(upstream: &str) -> Arc<Self> {
        tidings_core::sender::install_crypto_provider();
        Arc::new(Self {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client"),
            tables: Mutex::new(HashMap::new()),
            usage: Mutex::new(Usage::new()),
            faults: Mutex::new(Faults::default()),
            partitions: Mutex::new(BTreeMap::new()),
        })
    }

    /// The busiest partition key's share of each kind of access since start.
    pub fn partition_shares(&self) -> BTreeMap<String, PartitionShare> {
        self.partitions
            .lock()
            .unwrap()
            .iter()
            .map(|(access, keys)| {
                let requests: u64 = keys.values().sum();
                let (busiest, most) = keys
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map_or((String::new(), 0), |(k, n)| (k.clone(), *n));
                let share = PartitionShare {
                    requests,
                    distinct_keys: keys.len() as u64,
                    busiest_share: if requests == 0 {
                        0.0
                    } else {
                        (most as f64 / requests as f64 * 1000.0).round() / 1000.0
                    },
                    busiest_key: key_shape(&busiest),
                };
                (access.clone(), share)
            })
            .collect()
    }

    /// Counts the partition keys one DynamoDB request touches.
    fn record_partitions(
        &self,
        caller: &str,
        op: &str,
        request: &Value,
        writes: &[Write],
        schemas: &HashMap<String, Arc<TableSchema>>,
    ) {
        let mut touched: Vec<(String, String)> = Vec::new();
        match op {
            "GetItem" => touched.extend(scalar(&request["Key"]["pk"]).map(|k| ("table".into(), k))),
            "BatchGetItem" => {
                for asked in request["RequestItems"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(_, a)| a)
                {
                    for key in asked["Keys"].as_array().into_iter().flatten() {
                        touched.extend(scalar(&key["pk"]).map(|k| ("table".into(), k)));
                    }
                }
            }
            "Query" | "Scan" => {
                let on = request["IndexName"]
                    .as_str()
                    .map_or_else(|| "table".to_owned(), |i| format!("index {i}"));
                let condition = request["KeyConditionExpression"]
                    .as_str()
                    .unwrap_or_default();
                // The partition key's value: the first `= :placeholder` of the condition.
                let placeholder = condition
                    .split("= ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .unwrap_or_default();
                if let Some(k) = scalar(&request["ExpressionAttributeValues"][placeholder]) {
                    touched.push((on, k));
                }
            }
            _ => {}
        }
        for write in writes {
            let item = write.key_source();
            touched.extend(item.get("pk").and_then(scalar).map(|k| ("table".into(), k)));
            if let (Some(schema), Some(new)) = (schemas.get(&write.table), write.new.as_ref()) {
                for index in &schema.indexes {
                    let value = index.keys.first().and_then(|k| new.get(k)).and_then(scalar);
                    if let Some(k) = value {
                        touched.push((format!("index {} (writes)", index.name), k));
                    }
                }
            }
        }
        let mut partitions = self.partitions.lock().unwrap();
        for (on, key) in touched {
            *partitions
                .entry(format!("{caller} {op} on {on}"))
                .or_default()
                .entry(key)
                .or_default() += 1;
        }
    }

    /// Replaces the faults to inject (the counters carry on).
    pub fn set_faults(&self, faults: Faults) {
        let mut current = self.faults.lock().unwrap();
        current.lost_answers = faults.lost_answers;
        current.index_lag = faults.index_lag;
    }

    pub fn faults(&self) -> Faults {
        self.faults.lock().unwrap().clone()
    }

    /// Whether this request's answer is to be lost (and counts it).
    fn lose_answer(&self, caller: &str, operation: &str, body: &[u8]) -> bool {
        let mut faults = self.faults.lock().unwrap();
        let text = String::from_utf8_lossy(body);
        let Some(rule) = faults.lost_answers.iter_mut().find(|r| {
            r.times > 0
                && (r.caller.is_empty() || r.caller == caller)
                && r.operation == operation
                && text.contains(&r.contains)
        }) else {
            return false;
        };
        rule.times -= 1;
        faults.answers_lost += 1;
        true
    }

    /// Notes the items a successful write created, for the index lag.
    fn note_new_items(
        &self,
        writes: &[Write],
        before: &HashMap<usize, Item>,
        schemas: &HashMap<String, Arc<TableSchema>>,
    ) {
        let mut faults = self.faults.lock().unwrap();
        if faults.index_lag.is_zero() {
            return;
        }
        let now = std::time::Instant::now();
        let lag = faults.index_lag;
        faults
            .new_items
            .retain(|_, at| now.duration_since(*at) < lag);
        for (i, write) in writes.iter().enumerate() {
            let Some(schema) = schemas.get(&write.table) else {
                continue;
            };
            if write.new.is_none() || before.contains_key(&i) {
                continue; // an update: the index holds a row for it already
            }
            let key = Value::Object(schema.key_of(write.key_source())).to_string();
            faults.new_items.insert((write.table.clone(), key), now);
        }
    }

    /// A `Query` or `Scan` answer on a global secondary index without the rows of items created
    /// less than the lag ago; `None` when nothing is held back.
    fn hold_back_new_rows(&self, request: &Value, answer: &Value) -> Option<Value> {
        let mut faults = self.faults.lock().unwrap();
        if faults.index_lag.is_zero() || request["IndexName"].as_str().is_none() {
            return None;
        }
        let table = request["TableName"].as_str()?.to_owned();
        let schema = self.tables.lock().unwrap().get(&table).cloned()?;
        let now = std::time::Instant::now();
        let lag = faults.index_lag;
        let items = answer["Items"].as_array()?;
        let kept: Vec<Value> = items
            .iter()
            .filter(|item| {
                let Some(item) = item.as_object() else {
                    return true;
                };
                let key = Value::Object(schema.key_of(item)).to_string();
                faults
                    .new_items
                    .get(&(table.clone(), key))
                    .is_none_or(|at| now.duration_since(*at) >= lag)
            })
            .cloned()
            .collect();
        let held = items.len() - kept.len();
        if held == 0 {
            return None;
        }
        faults.index_rows_held_back += held as u64;
        let mut answer = answer.clone();
        answer["Count"] = json!(kept.len());
        answer["Items"] = Value::Array(kept);
        Some(answer)
    }

    /// Starts a listener on 127.0.0.1 for `caller`; its URL is that caller's `AWS_ENDPOINT_URL`.
    pub async fn listen(
        self: &Arc<Self>,
        caller: &str,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<(String, JoinHandle<()>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let router = Router::new()
            .fallback(forward)
            .with_state((Arc::clone(self), Arc::<str>::from(caller)));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        });
        Ok((format!("http://{addr}"), task))
    }

    pub fn snapshot(&self) -> Usage {
        self.usage.lock().unwrap().clone()
    }

    /// Zeroes the counters (the start of a measured stretch).
    pub fn reset(&self) {
        self.usage.lock().unwrap().clear();
    }

    fn record(&self, caller: &str, op: &str, usage: OpUsage) {
        let mut all = self.usage.lock().unwrap();
        all.entry(caller.to_owned())
            .or_default()
            .entry(op.to_owned())
            .or_default()
            .add(&usage);
    }

    /// One DynamoDB call of the meter's own, signed like the caller's request (moto takes the
    /// region from the credential scope).
    async fn dynamo(&self, headers: &HeaderMap, operation: &str, body: Value) -> Option<Value> {
        let mut request = self
            .http
            .post(format!("{}/", self.upstream))
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amz-target", format!("{DYNAMODB_PREFIX}{operation}"))
            .body(body.to_string());
        if let Some(auth) = headers.get("authorization") {
            request = request.header("authorization", auth.as_bytes());
        }
        let response = request.send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        serde_json::from_slice(&response.bytes().await.ok()?).ok()
    }

    async fn schema(&self, headers: &HeaderMap, table: &str) -> Option<Arc<TableSchema>> {
        if let Some(schema) = self.tables.lock().unwrap().get(table) {
            return Some(Arc::clone(schema));
        }
        let described = self
            .dynamo(headers, "DescribeTable", json!({ "TableName": table }))
            .await?;
        let schema = Arc::new(TableSchema::from_description(&described["Table"]));
        self.tables
            .lock()
            .unwrap()
            .insert(table.to_owned(), Arc::clone(&schema));
        Some(schema)
    }

    /// Fills in the item after each update of `writes` (which succeeded), read from the
    /// emulator: what the update billed is the larger of it and the item before.
    async fn items_after_updates(&self, headers: &HeaderMap, writes: &mut [Write]) {
        for write in writes.iter_mut().filter(|w| w.update) {
            let Some(schema) = self.schema(headers, &write.table).await else {
                continue;
            };
            write.new = self.current_item(headers, &schema, write).await;
        }
    }

    /// The item `write` is about to change (or changed), read strongly from the emulator.
    async fn current_item(
        &self,
        headers: &HeaderMap,
        schema: &TableSchema,
        write: &Write,
    ) -> Option<Item> {
        let key = schema.key_of(write.key_source());
        let got = self
            .dynamo(
                headers,
                "GetItem",
                json!({ "TableName": write.table, "Key": key, "ConsistentRead": true }),
            )
            .await;
        match got.and_then(|mut g| g.get_mut("Item").map(Value::take)) {
            Some(Value::Object(item)) => Some(item),
            _ => None,
        }
    }

    /// The items the writes are about to replace or delete, by the write's position, and the
    /// schemas of the tables they write.
    async fn items_before(&self, headers: &HeaderMap, writes: &[Write]) -> WriteContext {
        let mut before = HashMap::new();
        let mut schemas = HashMap::new();
        for (i, write) in writes.iter().enumerate() {
            let Some(schema) = self.schema(headers, &write.table).await else {
                continue;
            };
            schemas.insert(write.table.clone(), Arc::clone(&schema));
            if let Some(item) = self.current_item(headers, &schema, write).await {
                before.insert(i, item);
            }
        }
        (before, schemas)
    }
}

/// What computing a write's units needs: the items before it (by the write's position) and the
/// tables' schemas.
type WriteContext = (HashMap<usize, Item>, HashMap<String, Arc<TableSchema>>);

async fn forward(
    State((meter, caller)): State<(Arc<Meter>, Arc<str>)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_BODY_BYTES).await else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "request too large for the meter",
        )
            .into_response();
    };
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let request_json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let dynamo_op = target.strip_prefix(DYNAMODB_PREFIX);
    let mut writes = match dynamo_op {
        Some(op) => Write::of_request(op, &request_json),
        None => Vec::new(),
    };
    let (before, schemas) = if writes.is_empty() {
        (HashMap::new(), HashMap::new())
    } else {
        meter.items_before(&parts.headers, &writes).await
    };

    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut upstream = meter
        .http
        .request(parts.method.clone(), format!("{}{path}", meter.upstream))
        .body(body.clone());
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) {
            upstream = upstream.header(name, value);
        }
    }
    let (status, headers, answer) = match upstream.send().await {
        Ok(response) => {
            let status = response.status();
            let headers = response.headers().clone();
            match response.bytes().await {
                Ok(answer) => (status, headers, answer),
                Err(error) => return bad_gateway(&error),
            }
        }
        Err(error) => return bad_gateway(&error),
    };

    let answer_json: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    if status.is_success() {
        meter.items_after_updates(&parts.headers, &mut writes).await;
    }
    if !status.is_success() {
        let error = answer_json["__type"].as_str().unwrap_or_default();
        tracing::info!(%caller, %target, %status, error, "meter: the emulator answered with an error");
    }
    if let Some(op) = dynamo_op {
        let usage = dynamo_usage(
            op,
            &request_json,
            status.is_success(),
            &answer_json,
            &writes,
            &before,
            &schemas,
        );
        meter.record(&caller, &format!("dynamodb.{op}"), usage);
        if status.is_success() {
            meter.record_partitions(&caller, op, &request_json, &writes, &schemas);
        }
    } else {
        let op = target
            .strip_prefix(SQS_PREFIX)
            .map(str::to_owned)
            .or_else(|| query_action(&body))
            .unwrap_or_else(|| "unknown".to_owned());
        let usage = sqs_usage(&op, &request_json, status.is_success(), &answer_json);
        meter.record(&caller, &format!("sqs.{op}"), usage);
    }

    if let Some(op) = dynamo_op {
        if status.is_success() && !writes.is_empty() {
            meter.note_new_items(&writes, &before, &schemas);
        }
        if meter.lose_answer(&caller, op, &body) {
            tracing::info!(%caller, %target, "meter: the write went through; its answer is lost");
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                [("content-type", "application/x-amz-json-1.0")],
                json!({
                    "__type": "com.amazonaws.dynamodb.v20120810#InternalServerError",
                    "message": "the answer was lost (a fault the stand-in injected)",
                })
                .to_string(),
            )
                .into_response();
        }
        if status.is_success()
            && matches!(op, "Query" | "Scan")
            && let Some(held_back) = meter.hold_back_new_rows(&request_json, &answer_json)
        {
            // The body changed: its checksum header no longer fits.
            let mut response = (status, held_back.to_string()).into_response();
            for (name, value) in &headers {
                if !is_hop_by_hop(name)
                    && name.as_str() != "x-amz-crc32"
                    && name != "content-length"
                {
                    response.headers_mut().insert(name, value.clone());
                }
            }
            return response;
        }
    }

    let mut response = (status, answer).into_response();
    for (name, value) in &headers {
        if !is_hop_by_hop(name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

/// A DynamoDB JSON scalar (`{"S": …}`, `{"N": …}`) as text.
fn scalar(value: &Value) -> Option<String> {
    value["S"]
        .as_str()
        .or_else(|| value["N"].as_str())
        .map(str::to_owned)
}

/// A partition key with its ids replaced by their kind: `T#t1#SUB#sub_01…#DLVS` reads as
/// `T#{tenant}#SUB#{id}#DLVS`, a shard number as `{n}`.
fn key_shape(key: &str) -> String {
    let parts: Vec<&str> = key.split('#').collect();
    if parts.len() == 1 {
        return if key.bytes().all(|b| b.is_ascii_digit()) {
            "{n}".to_owned()
        } else {
            "{key}".to_owned()
        };
    }
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let previous = if i > 0 { parts[i - 1] } else { "" };
            match previous {
                "T" => "{tenant}",
                "SUB" | "EVT" | "DLV" | "IDEM" | "KEY" => "{id}",
                _ => p,
            }
        })
        .collect::<Vec<_>>()
        .join("#")
}

fn bad_gateway(error: &reqwest::Error) -> Response {
    tracing::warn!(%error, "meter: the emulator did not answer");
    (StatusCode::BAD_GATEWAY, "the emulator did not answer").into_response()
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive" | "upgrade"
    )
}

/// The `Action` of an SQS query-protocol request (form body), should a client still use it.
fn query_action(body: &Bytes) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.into_owned())
}

fn sqs_usage(op: &str, request: &Value, ok: bool, answer: &Value) -> OpUsage {
    let mut usage = OpUsage {
        calls: 1,
        errors: u64::from(!ok),
        ..OpUsage::default()
    };
    if !ok {
        return usage;
    }
    let count = |v: &Value| v.as_array().map_or(0, |a| a.len() as u64);
    match op {
        "SendMessage" | "DeleteMessage" => usage.messages = 1,
        "SendMessageBatch" | "DeleteMessageBatch" => usage.messages = count(&request["Entries"]),
        "ReceiveMessage" => {
            usage.messages = count(&answer["Messages"]);
            usage.empty_receives = u64::from(usage.messages == 0);
        }
        _ => {}
    }
    usage
}

type Item = Map<String, Value>;

/// One item written by a request: a put (the new item), a delete (its key), or an update (its
/// key; the item after it is read from the emulator once it succeeded).
#[derive(Debug)]
struct Write {
    table: String,
    new: Option<Item>,
    key: Option<Item>,
    transactional: bool,
    update: bool,
}

impl Write {
    fn key_source(&self) -> &Item {
        self.new
            .as_ref()
            .or(self.key.as_ref())
            .expect("a write has an item or a key")
    }

    fn of_request(op: &str, request: &Value) -> Vec<Write> {
        let table = |v: &Value| v["TableName"].as_str().unwrap_or_default().to_owned();
        let object = |v: &Value| v.as_object().cloned();
        match op {
            "PutItem" => object(&request["Item"])
                .map(|item| Write {
                    table: table(request),
                    new: Some(item),
                    key: None,
                    transactional: false,
                    update: false,
                })
                .into_iter()
                .collect(),
            "DeleteItem" | "UpdateItem" => object(&request["Key"])
                .map(|key| Write {
                    table: table(request),
                    new: None,
                    key: Some(key),
                    transactional: false,
                    update: op == "UpdateItem",
                })
                .into_iter()
                .collect(),
            "TransactWriteItems" => request["TransactItems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|action| {
                    if let Some(put) = action.get("Put") {
                        Some(Write {
                            table: table(put),
                            new: object(&put["Item"]),
                            key: None,
                            transactional: true,
                            update: false,
                        })
                    } else {
                        // Delete (and the unmodelled Update / ConditionCheck) by key.
                        let inner = action.as_object()?.values().next()?;
                        Some(Write {
                            table: table(inner),
                            new: None,
                            key: object(&inner["Key"]),
                            transactional: true,
                            update: false,
                        })
                    }
                })
                .filter(|w| w.new.is_some() || w.key.is_some())
                .collect(),
            "BatchWriteItem" => request["RequestItems"]
                .as_object()
                .into_iter()
                .flatten()
                .flat_map(|(table, requests)| {
                    requests
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(move |r| {
                            let put = object(&r["PutRequest"]["Item"]);
                            let key = object(&r["DeleteRequest"]["Key"]);
                            (put.is_some() || key.is_some()).then(|| Write {
                                table: table.clone(),
                                new: put,
                                key,
                                transactional: false,
                                update: false,
                            })
                        })
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn dynamo_usage(
    op: &str,
    request: &Value,
    ok: bool,
    answer: &Value,
    writes: &[Write],
    before: &HashMap<usize, Item>,
    schemas: &HashMap<String, Arc<TableSchema>>,
) -> OpUsage {
    let mut usage = OpUsage {
        calls: 1,
        errors: u64::from(!ok),
        ..OpUsage::default()
    };
    let consistent = request["ConsistentRead"].as_bool().unwrap_or(false);
    match op {
        "GetItem" if ok => {
            let size = answer["Item"].as_object().map_or(0, item_size);
            usage.read_units = read_units(size, consistent);
        }
        "Query" | "Scan" if ok => {
            let size: u64 = answer["Items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_object)
                .map(item_size)
                .sum();
            usage.read_units = read_units(size, consistent);
        }
        "BatchGetItem" if ok => {
            for (table, asked) in request["RequestItems"].as_object().into_iter().flatten() {
                let consistent = asked["ConsistentRead"].as_bool().unwrap_or(false);
                let keys = asked["Keys"].as_array().map_or(0, Vec::len);
                let found: Vec<u64> = answer["Responses"][table]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_object)
                    .map(item_size)
                    .collect();
                let unprocessed = answer["UnprocessedKeys"][table]["Keys"]
                    .as_array()
                    .map_or(0, Vec::len);
                let missing = keys.saturating_sub(found.len() + unprocessed);
                usage.read_units += found
                    .iter()
                    .map(|&size| read_units(size, consistent))
                    .sum::<f64>()
                    + missing as f64 * read_units(0, consistent);
            }
        }
        _ => {}
    }
    let failed_condition = !ok
        && answer["__type"]
            .as_str()
            .is_some_and(|t| t.ends_with("ConditionalCheckFailedException"));
    for (i, write) in writes.iter().enumerate() {
        let old = before.get(&i);
        let new = write.new.as_ref();
        let size = old.map_or(0, item_size).max(new.map_or(0, item_size));
        let factor = if write.transactional { 2.0 } else { 1.0 };
        if ok || failed_condition {
            usage.write_units += factor * write_units(size);
        }
        if ok && let Some(schema) = schemas.get(&write.table) {
            usage.index_write_units += schema.index_write_units(old, new);
        }
    }
    usage
}

/// Read units for `size` bytes read at once.
pub fn read_units(size: u64, consistent: bool) -> f64 {
    let units = size.div_ceil(4096).max(1) as f64;
    if consistent { units } else { units / 2.0 }
}

/// Write units for an item of `size` bytes.
pub fn write_units(size: u64) -> f64 {
    size.div_ceil(1024).max(1) as f64
}

/// An item's size as DynamoDB bills it (attribute names + values).
pub fn item_size(item: &Item) -> u64 {
    item.iter()
        .map(|(name, value)| name.len() as u64 + value_size(value))
        .sum()
}

fn value_size(value: &Value) -> u64 {
    let Some((kind, v)) = value.as_object().and_then(|o| o.iter().next()) else {
        return 0;
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    match kind.as_str() {
        "S" => v.as_str().map_or(0, |s| s.len() as u64),
        "N" => v.as_str().map_or(0, number_size),
        "B" => v.as_str().map_or(0, base64_len),
        "BOOL" | "NULL" => 1,
        "SS" => strings(v).iter().map(|s| s.len() as u64).sum(),
        "NS" => strings(v).iter().map(|s| number_size(s)).sum(),
        "BS" => strings(v).iter().map(|s| base64_len(s)).sum(),
        "L" => {
            let elements = v.as_array().map_or(&[][..], Vec::as_slice);
            3 + elements.iter().map(|e| 1 + value_size(e)).sum::<u64>()
        }
        "M" => {
            let Some(map) = v.as_object() else { return 3 };
            3 + map
                .iter()
                .map(|(k, e)| 1 + k.len() as u64 + value_size(e))
                .sum::<u64>()
        }
        _ => 0,
    }
}

/// 1 byte per two significant digits, plus 1.
fn number_size(n: &str) -> u64 {
    let digits: String = n
        .trim_start_matches(['-', '+'])
        .chars()
        .take_while(|c| *c != 'e' && *c != 'E')
        .filter(char::is_ascii_digit)
        .collect();
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len() as u64;
    significant.max(1).div_ceil(2) + 1
}

fn base64_len(s: &str) -> u64 {
    let padding = s.bytes().rev().take_while(|b| *b == b'=').count() as u64;
    (s.len() as u64 / 4 * 3).saturating_sub(padding)
}

#[derive(Debug, Clone, PartialEq)]
enum Projection {
    All,
    KeysOnly,
    Include(Vec<String>),
}

#[derive(Debug, Clone)]
struct IndexSchema {
    name: String,
    keys: Vec<String>,
    projection: Projection,
}

/// The parts of a table's description the meter needs: its key and its global indexes.
#[derive(Debug, Clone)]
pub struct TableSchema {
    keys: Vec<String>,
    indexes: Vec<IndexSchema>,
}

fn key_names(schema: &Value) -> Vec<String> {
    schema
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k["AttributeName"].as_str().map(str::to_owned))
        .collect()
}

impl TableSchema {
    fn from_description(table: &Value) -> Self {
        let indexes = table["GlobalSecondaryIndexes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|index| {
                let projection = match index["Projection"]["ProjectionType"].as_str() {
                    Some("KEYS_ONLY") => Projection::KeysOnly,
                    Some("INCLUDE") => Projection::Include(
                        index["Projection"]["NonKeyAttributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|a| a.as_str().map(str::to_owned))
                            .collect(),
                    ),
                    _ => Projection::All,
                };
                IndexSchema {
                    name: index["IndexName"].as_str().unwrap_or_default().to_owned(),
                    keys: key_names(&index["KeySchema"]),
                    projection,
                }
            })
            .collect();
        Self {
            keys: key_names(&table["KeySchema"]),
            indexes,
        }
    }

    fn key_of(&self, item: &Item) -> Item {
        self.keys
            .iter()
            .filter_map(|k| Some((k.clone(), item.get(k)?.clone())))
            .collect()
    }

    /// Index write units for an item going from `old` to `new` (either may be absent).
    fn index_write_units(&self, old: Option<&Item>, new: Option<&Item>) -> f64 {
        let mut units = 0.0;
        for index in &self.indexes {
            let project = |item: Option<&Item>| -> Option<Item> {
                let item = item?;
                if !index.keys.iter().all(|k| item.contains_key(k)) {
                    return None;
                }
                Some(
                    item.iter()
                        .filter(|(name, _)| {
                            self.keys.contains(name)
                                || index.keys.contains(name)
                                || match &index.projection {
                                    Projection::All => true,
                                    Projection::KeysOnly => false,
                                    Projection::Include(names) => names.contains(name),
                                }
                        })
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
            };
            let size = |item: &Item| write_units(item_size(item));
            units += match (project(old), project(new)) {
                (None, None) => 0.0,
                (None, Some(entry)) | (Some(entry), None) => size(&entry),
                (Some(was), Some(is)) => {
                    let key_changed = index.keys.iter().any(|k| was.get(k) != is.get(k));
                    if key_changed {
                        size(&was) + size(&is)
                    } else if was != is {
                        size(&was).max(size(&is))
                    } else {
                        0.0
                    }
                }
            };
        }
        units
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(v: Value) -> Item {
        v.as_object().unwrap().clone()
    }

    fn schema() -> TableSchema {
        TableSchema::from_description(&json!({
            "KeySchema": [{"AttributeName": "pk", "KeyType": "HASH"}],
            "GlobalSecondaryIndexes": [
                {"IndexName": "list",
                 "KeySchema": [{"AttributeName": "list_pk", "KeyType": "HASH"},
                               {"AttributeName": "list_sk", "KeyType": "RANGE"}],
                 "Projection": {"ProjectionType": "INCLUDE", "NonKeyAttributes": ["subscription"]}},
                {"IndexName": "due",
                 "KeySchema": [{"AttributeName": "due_shard", "KeyType": "HASH"},
                               {"AttributeName": "due_at", "KeyType": "RANGE"}],
                 "Projection": {"ProjectionType": "KEYS_ONLY"}}
            ]
        }))
    }

    #[test]
    fn partition_keys_read_as_their_shape() {
        assert_eq!(key_shape("T#t1#SUBS"), "T#{tenant}#SUBS");
        assert_eq!(
            key_shape("T#acme#SUB#sub_01h#DLVS"),
            "T#{tenant}#SUB#{id}#DLVS"
        );
        assert_eq!(key_shape("T#a#EVT#order-1"), "T#{tenant}#EVT#{id}");
        assert_eq!(key_shape("KEY#5e88"), "KEY#{id}");
        assert_eq!(key_shape("3"), "{n}");
    }

    #[test]
    fn sizes_follow_the_published_rules() {
        // Names count: "pk" (2) + "abc" (3); "n" (1) + 12345 (3 digits-pairs → 3 + 1 = 4).
        assert_eq!(
            item_size(&item(json!({"pk": {"S": "abc"}, "n": {"N": "12345"}}))),
            5 + 5
        );
        assert_eq!(number_size("100"), 2, "trailing zeros are not significant");
        assert_eq!(number_size("-0.0012"), 2);
        assert_eq!(
            item_size(&item(
                json!({"b": {"BOOL": true}, "z": {"NULL": true}, "x": {"B": "AAEC"}})
            )),
            2 + 2 + 4
        );
        // A map: 3 + per element (1 + name + value).
        assert_eq!(
            item_size(&item(json!({"m": {"M": {"ab": {"S": "xyz"}}}}))),
            1 + 3 + 1 + 2 + 3
        );
        assert_eq!(
            item_size(&item(json!({"l": {"L": [{"S": "a"}, {"S": "bc"}]}}))),
            1 + 3 + 2 + 3
        );
    }

    #[test]
    fn units_round_up_with_a_floor_of_one() {
        assert_eq!(write_units(0), 1.0);
        assert_eq!(write_units(1024), 1.0);
        assert_eq!(write_units(1025), 2.0);
        assert_eq!(read_units(4096, true), 1.0);
        assert_eq!(read_units(4097, true), 2.0);
        assert_eq!(read_units(10, false), 0.5);
    }

    #[test]
    fn index_writes_follow_the_item_in_and_out_of_each_index() {
        let s = schema();
        let due = |at: &str| {
            item(
                json!({"pk": {"S": "D#1"}, "due_shard": {"N": "3"}, "due_at": {"N": at},
                        "list_pk": {"S": "L"}, "list_sk": {"S": "1"}, "delivery": {"M": {}}}),
            )
        };
        let created = due("1000");
        // Enters both indexes.
        assert_eq!(s.index_write_units(None, Some(&created)), 2.0);
        // due_at moves: delete + put in `due`; `list` projects keys only for deliveries, unchanged.
        assert_eq!(s.index_write_units(Some(&created), Some(&due("2000"))), 2.0);
        // Only a non-projected attribute changes: no index write.
        let mut touched = created.clone();
        touched.insert("delivery".into(), json!({"M": {"state": {"S": "x"}}}));
        assert_eq!(s.index_write_units(Some(&created), Some(&touched)), 0.0);
        // Leaves `due` (due_at removed): one delete.
        let mut done = created.clone();
        done.remove("due_at");
        done.remove("due_shard");
        assert_eq!(s.index_write_units(Some(&created), Some(&done)), 1.0);
        // A projected attribute changes in `list` (subscription body): one write there.
        let sub = |v: &str| {
            item(
                json!({"pk": {"S": "S#1"}, "list_pk": {"S": "L"}, "list_sk": {"S": "1"},
                        "subscription": {"M": {"v": {"S": v}}}}),
            )
        };
        assert_eq!(s.index_write_units(Some(&sub("a")), Some(&sub("b"))), 1.0);
        assert_eq!(s.index_write_units(Some(&sub("a")), None), 1.0);
    }

    #[test]
    fn a_transaction_doubles_table_writes_and_a_failed_condition_still_costs() {
        let s = Arc::new(schema());
        let schemas = HashMap::from([("t".to_owned(), Arc::clone(&s))]);
        let request = json!({"TransactItems": [
            {"Put": {"TableName": "t", "Item": {"pk": {"S": "E#1"}, "event": {"S": "x"}}}},
            {"Put": {"TableName": "t", "Item": {"pk": {"S": "D#1"}, "due_shard": {"N": "1"}, "due_at": {"N": "5"}}}}
        ]});
        let writes = Write::of_request("TransactWriteItems", &request);
        let usage = dynamo_usage(
            "TransactWriteItems",
            &request,
            true,
            &Value::Null,
            &writes,
            &HashMap::new(),
            &schemas,
        );
        assert_eq!((usage.write_units, usage.index_write_units), (4.0, 1.0));

        let request = json!({"TableName": "t", "Item": {"pk": {"S": "E#1"}}});
        let writes = Write::of_request("PutItem", &request);
        let failed =
            json!({"__type": "com.amazonaws.dynamodb.v20120810#ConditionalCheckFailedException"});
        let usage = dynamo_usage(
            "PutItem",
            &request,
            false,
            &failed,
            &writes,
            &HashMap::new(),
            &schemas,
        );
        assert_eq!((usage.errors, usage.write_units), (1, 1.0));
    }

    #[test]
    fn reads_bill_by_size_and_consistency() {
        let answer = json!({"Item": {"pk": {"S": "x".repeat(5000)}}});
        let get = dynamo_usage(
            "GetItem",
            &json!({"ConsistentRead": true}),
            true,
            &answer,
            &[],
            &HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(get.read_units, 2.0);
        let missing = dynamo_usage(
            "GetItem",
            &json!({}),
            true,
            &json!({}),
            &[],
            &HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(missing.read_units, 0.5);
        let query = dynamo_usage(
            "Query",
            &json!({"IndexName": "due"}),
            true,
            &json!({"Items": [{"pk": {"S": "a"}}, {"pk": {"S": "b"}}]}),
            &[],
            &HashMap::new(),
            &HashMap::new(),
        );
        assert_eq!(
            query.read_units, 0.5,
            "a query rounds the sum, not each item"
        );
    }

    #[test]
    fn sqs_counts_messages_and_empty_receives() {
        let sent = sqs_usage(
            "SendMessageBatch",
            &json!({"Entries": [{}, {}, {}]}),
            true,
            &json!({}),
        );
        assert_eq!((sent.calls, sent.messages), (1, 3));
        let empty = sqs_usage("ReceiveMessage", &json!({}), true, &json!({}));
        assert_eq!((empty.messages, empty.empty_receives), (0, 1));
        let got = sqs_usage(
            "ReceiveMessage",
            &json!({}),
            true,
            &json!({"Messages": [{}, {}]}),
        );
        assert_eq!((got.messages, got.empty_receives), (2, 0));
    }
}
