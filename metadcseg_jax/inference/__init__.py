"""Using a trained model: predictions for new images and volumes in their own geometry, a model
folder that travels without its training data, and scores of prediction folders."""
