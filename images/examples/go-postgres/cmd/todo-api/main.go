// Command todo-api serves the to-do list on $PORT (default 8080) from $DATABASE_URL.
package main

import (
	"context"
	"database/sql"
	"log"
	"net/http"
	"os"

	_ "github.com/lib/pq"

	"example.com/todo/todo"
)

func main() {
	db, err := sql.Open("postgres", os.Getenv("DATABASE_URL"))
	if err != nil {
		log.Fatal(err)
	}
	store, err := todo.NewStore(context.Background(), db)
	if err != nil {
		log.Fatal(err)
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8080"
	}
	log.Printf("todo-api listening on http://localhost:%s", port)
	log.Fatal(http.ListenAndServe(":"+port, todo.Handler(store)))
}
