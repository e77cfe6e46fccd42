//! Upgrades: a database an older release left (migrations up to 0008, before Label Studio
//! instances) keeps every row through migration 0009, all of it in the default instance, and
//! the same ids are then free in any other instance.

use batchlab_core::store::{NewWebhookEvent, Store};
use batchlab_core::testing::EmptyDb;
use sqlx::Executor;

/// Rows of every table that holds Label Studio's ids, written as release 0008 wrote them.
const OLD_ROWS: &[&str] = &[
    "INSERT INTO webhook_events (delivery_key, action, project_id, body, received_at, processed_at, outcome) \
     VALUES ('k1', 'ANNOTATION_CREATED', 1, '{}', 1, 2, 'applied')",
    "INSERT INTO ls_projects (id, title, label_config, updated_at_us) VALUES (1, 'old project', '<View/>', 5)",
    "INSERT INTO ls_tasks (id, project_id, data) VALUES (10, 1, '{\"text\": \"t\"}')",
    "INSERT INTO ls_annotations (id, project_id, task_id, result, ground_truth) VALUES (100, 1, 10, '[]', 1)",
    "INSERT INTO ls_annotations (id, project_id, task_id, result, deleted) VALUES (101, 1, 10, '[]', 1)",
    "INSERT INTO ls_predictions (project_id, task_id, model_version, source, result, created_at) \
     VALUES (1, 10, 'v1', 'import', '[]', 3)",
    "INSERT INTO curation_exports (project_id, reason, milestone, path, tasks, annotations, created_at, sha256) \
     VALUES (1, 'milestone', 100, 'data/training/project_1_milestone_100.json', 1, 1, 4, 'ab')",
    "INSERT INTO accuracy_records (project_id, checkpoint, report, created_at) VALUES (1, 100, '{}', 5)",
    "INSERT INTO ls_import_lines (project_id, batch_id, custom_id, task_id, sent_at) VALUES (1, 'batch_a', 'c1', 10, 6)",
    "INSERT INTO ls_conflicts (event_id, action, project_id, kind, entity, entity_id, reason, body, detected_at) \
     VALUES (1, 'ANNOTATION_CREATED', 1, 'annotation_recreated', 'annotation', 100, 'r', '{}', 7)",
];

async fn upgrade_keeps_rows_in_the_default_instance(db: EmptyDb) {
    db.migrate_to(8).await;
    {
        sqlx::any::install_default_drivers();
        let pool = sqlx::AnyPool::connect(&db.url).await.unwrap();
        for sql in OLD_ROWS {
            pool.execute(*sql).await.unwrap();
        }
        pool.close().await;
    }
    let store = Store::connect(&db.url, 2)
        .await
        .expect("the upgrade applies");

    let project = store.get_project("default", 1).await.unwrap().unwrap();
    assert_eq!(
        (project.title.as_str(), project.created_at),
        ("old project", None)
    );
    let counts = store.annotation_counts("default", 1).await.unwrap();
    assert_eq!(
        (counts.tasks, counts.annotations, counts.ground_truth),
        (1, 1, 1)
    );
    assert_eq!(
        store.ground_truth_tasks("default", 1).await.unwrap().len(),
        1
    );
    assert_eq!(
        store
            .predictions_in_range("default", 1, i64::MIN, i64::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    let exports = store.exports("default", 1).await.unwrap();
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].sha256.as_deref(), Some("ab"));
    assert_eq!(store.accuracy_records("default", 1).await.unwrap().len(), 1);
    assert_eq!(
        store.imported_lines("default", 1, "batch_a").await.unwrap()[0].task_id,
        Some(10)
    );
    assert_eq!(store.conflicts("default", 1, 10).await.unwrap().count, 1);
    let counts = store
        .webhook_event_counts(Some(("default", 1)))
        .await
        .unwrap();
    assert_eq!((counts.received, counts.pending), (1, 0));
    // The milestone is still claimed once per project of the default instance.
    assert!(!store
        .claim_milestone("default", 1, 100, "p", 600)
        .await
        .unwrap());

    // Another instance holds none of it, and its ids are free.
    assert!(store.get_project("ls2", 1).await.unwrap().is_none());
    assert_eq!(
        store.annotation_counts("ls2", 1).await.unwrap(),
        Default::default()
    );
    assert!(store.exports("ls2", 1).await.unwrap().is_empty());
    assert!(store
        .claim_milestone("ls2", 1, 100, "p", 600)
        .await
        .unwrap());
    let (_, new) = store
        .insert_webhook_event(&NewWebhookEvent {
            instance: "ls2",
            delivery_key: "k1",
            action: "ANNOTATION_CREATED",
            project_id: Some(1),
            body: "{}",
        })
        .await
        .unwrap();
    assert!(
        new,
        "the same body from another instance is another delivery"
    );
    let (id, new) = store
        .insert_webhook_event(&NewWebhookEvent {
            instance: "default",
            delivery_key: "k1",
            action: "ANNOTATION_CREATED",
            project_id: Some(1),
            body: "{}",
        })
        .await
        .unwrap();
    assert_eq!((id, new), (1, false), "a duplicate within the instance");
    // AUTOINCREMENT / BIGSERIAL sequences go on after the copied ids.
    let (next, _) = store
        .insert_webhook_event(&NewWebhookEvent {
            instance: "default",
            delivery_key: "k2",
            action: "ANNOTATION_CREATED",
            project_id: Some(1),
            body: "{}",
        })
        .await
        .unwrap();
    assert!(next > 2, "{next}");
    store.close().await;
    db.cleanup().await;
}

#[tokio::test]
async fn sqlite_upgrade_keeps_rows_in_the_default_instance() {
    upgrade_keeps_rows_in_the_default_instance(EmptyDb::sqlite()).await;
}

#[tokio::test]
async fn postgres_upgrade_keeps_rows_in_the_default_instance() {
    let Some(db) = EmptyDb::postgres().await else {
        return;
    };
    upgrade_keeps_rows_in_the_default_instance(db).await;
}
