//! The table and queues one run of the stand-in owns, created in the emulator at start.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::json;
use tidings_core::aws::dynamo::DynamoStore;

/// Names and addresses of everything created.
#[derive(Debug, Clone)]
pub struct Resources {
    pub table: String,
    pub events: Queue,
    pub events_dlq: Queue,
    pub deliveries: Queue,
    pub deliveries_dlq: Queue,
    /// The DynamoDB stream mapping's on-failure destination (records of given-up batches).
    pub fan_out_dlq: Queue,
    /// The table's change stream (`LatestStreamArn`), if it has one (a table created by this
    /// stand-in does; one reused from elsewhere may not).
    pub stream_arn: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub name: String,
    pub url: String,
    pub arn: String,
}

impl Resources {
    pub fn names(prefix: &str) -> [String; 6] {
        [
            format!("{prefix}table"),
            format!("{prefix}events"),
            format!("{prefix}events-dlq"),
            format!("{prefix}deliveries"),
            format!("{prefix}deliveries-dlq"),
            format!("{prefix}fan-out-dlq"),
        ]
    }

    /// Creates the table (with its change stream) and the five queues (each main queue redrives
    /// to its DLQ; `fan-out-dlq` receives the stream mapping's failure records).
    pub async fn create(
        dynamo: &aws_sdk_dynamodb::Client,
        sqs: &aws_sdk_sqs::Client,
        prefix: &str,
        visibility_timeout: Duration,
        max_receive_count: u32,
    ) -> anyhow::Result<Self> {
        let [
            table,
            events,
            events_dlq,
            deliveries,
            deliveries_dlq,
            fan_out_dlq,
        ] = Self::names(prefix);
        DynamoStore::create_table(dynamo, &table)
            .await
            .with_context(|| format!("creating DynamoDB table {table}"))?;
        let stream_arn = dynamo
            .describe_table()
            .table_name(&table)
            .send()
            .await
            .map_err(|e| {
                anyhow!(
                    "describing DynamoDB table {table}: {}",
                    aws_sdk_dynamodb::error::DisplayErrorContext(&e)
                )
            })?
            .table
            .filter(|t| {
                t.stream_specification
                    .as_ref()
                    .is_some_and(|s| s.stream_enabled)
            })
            .and_then(|t| t.latest_stream_arn);
        let fan_out_dlq = create_queue(sqs, &fan_out_dlq, dlq_attributes()).await?;
        let events_dlq = create_queue(sqs, &events_dlq, dlq_attributes()).await?;
        let deliveries_dlq = create_queue(sqs, &deliveries_dlq, dlq_attributes()).await?;
        let events = create_queue(
            sqs,
            &events,
            main_attributes(&events_dlq, visibility_timeout, max_receive_count),
        )
        .await?;
        let deliveries = create_queue(
            sqs,
            &deliveries,
            main_attributes(&deliveries_dlq, visibility_timeout, max_receive_count),
        )
        .await?;
        Ok(Self {
            table,
            events,
            events_dlq,
            deliveries,
            deliveries_dlq,
            fan_out_dlq,
            stream_arn,
        })
    }

    /// The account id in the queues' ARNs (`arn:aws:sqs:REGION:ACCOUNT:NAME`).
    pub fn account_id(&self) -> String {
        self.events
            .arn
            .split(':')
            .nth(4)
            .filter(|a| !a.is_empty())
            .unwrap_or("123456789012")
            .to_owned()
    }

    /// Deletes everything (for `--cleanup`); failures are logged, not returned.
    pub async fn delete(&self, dynamo: &aws_sdk_dynamodb::Client, sqs: &aws_sdk_sqs::Client) {
        for queue in [
            &self.events,
            &self.deliveries,
            &self.events_dlq,
            &self.deliveries_dlq,
            &self.fan_out_dlq,
        ] {
            if let Err(error) = sqs.delete_queue().queue_url(&queue.url).send().await {
                tracing::warn!(queue = %queue.name, error = %DisplayErrorContext(&error), "DeleteQueue failed");
            }
        }
        if let Err(error) = dynamo.delete_table().table_name(&self.table).send().await {
            tracing::warn!(table = %self.table, error = %aws_sdk_dynamodb::error::DisplayErrorContext(&error), "DeleteTable failed");
        }
    }
}

fn dlq_attributes() -> HashMap<QueueAttributeName, String> {
    // 14 days, the most SQS keeps a message: dead letters stay inspectable.
    [(
        QueueAttributeName::MessageRetentionPeriod,
        "1209600".to_owned(),
    )]
    .into()
}

fn main_attributes(
    dlq: &Queue,
    visibility_timeout: Duration,
    max_receive_count: u32,
) -> HashMap<QueueAttributeName, String> {
    [
        (
            QueueAttributeName::VisibilityTimeout,
            whole_seconds(visibility_timeout).to_string(),
        ),
        (
            QueueAttributeName::RedrivePolicy,
            json!({
                "deadLetterTargetArn": dlq.arn,
                "maxReceiveCount": max_receive_count,
            })
            .to_string(),
        ),
    ]
    .into()
}

/// SQS counts visibility in whole seconds: round up.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attributes: HashMap<QueueAttributeName, String>,
) -> anyhow::Result<Queue> {
    let created = sqs
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attributes))
        .send()
        .await
        .map_err(|e| anyhow!("creating SQS queue {name}: {}", DisplayErrorContext(&e)))?;
    let url = created
        .queue_url
        .with_context(|| format!("CreateQueue {name} returned no QueueUrl"))?;
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| {
            anyhow!(
                "reading the ARN of queue {name}: {}",
                DisplayErrorContext(&e)
            )
        })?;
    let arn = attributes
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn))
        .cloned()
        .with_context(|| format!("queue {name} has no QueueArn"))?;
    Ok(Queue {
        name: name.to_owned(),
        url,
        arn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::ZERO), 0);
    }

    #[test]
    fn main_queues_redrive_to_their_dlq() {
        let dlq = Queue {
            name: "p-events-dlq".into(),
            url: "http://x/p-events-dlq".into(),
            arn: "arn:aws:sqs:us-east-1:123456789012:p-events-dlq".into(),
        };
        let attrs = main_attributes(&dlq, Duration::from_secs(30), 3);
        assert_eq!(attrs[&QueueAttributeName::VisibilityTimeout], "30");
        let policy: serde_json::Value =
            serde_json::from_str(&attrs[&QueueAttributeName::RedrivePolicy]).unwrap();
        assert_eq!(
            policy,
            json!({"deadLetterTargetArn": dlq.arn, "maxReceiveCount": 3})
        );
    }
}
