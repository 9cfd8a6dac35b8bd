"""sidemesh's chained CNI plugin, its node installer and the pod-side validation check."""
