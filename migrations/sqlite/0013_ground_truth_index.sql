-- A project's ground-truth annotations, read for every accuracy record (each time the count of
-- annotations crosses a multiple of curation.accuracy_every) and every accuracy request: without
-- an index of them alone, each read went through all of the project's annotations, which slowed
-- the webhook processor down more with every annotation a big project gained.
CREATE INDEX ls_annotations_ground_truth ON ls_annotations (instance, project_id, task_id)
    WHERE ground_truth = 1 AND deleted = 0;
